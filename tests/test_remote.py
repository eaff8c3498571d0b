"""Shard sets read from elsewhere: `fit`, `evaluate`, `verify` and `inspect` over http from a loopback
server this module starts; `verify`, `inspect` and the trainer's loaders over a `pipe:` command, the way
object stores are read (a stand-in `aws` serving a local "bucket"). A shard that answers 404, or whose connection is cut mid-body, stops the
command with one line naming the URL (and, for training, the retry policy). `verify`/`inspect` over http
with a missing shard or set: tests/test_verify.py."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import FIT_ARGS, assert_one_line_error, run_cli

from pipeline.manifest import load_manifest
from train.rundir import shard_set_id

FAKE_AWS = """#!/bin/sh
# Stand-in for `aws s3 cp s3://BUCKET/KEY -`: prints $FAKE_S3/BUCKET/KEY, fails like aws when it is missing.
if [ "$1 $2" != "s3 cp" ] || [ "$4" != "-" ]; then echo "usage: aws s3 cp s3://BUCKET/KEY -" >&2; exit 2; fi
path="$FAKE_S3/${3#s3://}"
if [ ! -f "$path" ]; then
  echo "download failed: $3 to - An error occurred (404) when calling the HeadObject operation: Not Found" >&2
  exit 1
fi
exec cat "$path"
"""


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; names in `missing` answer 404, names in `cut` send the full Content-Length and
    close after half the body. Every requested path is recorded."""

    missing: frozenset[str] = frozenset()
    cut: frozenset[str] = frozenset()
    requests: list[str]

    def log_message(self, *args: object) -> None:
        """Keep test output quiet."""

    def do_GET(self) -> None:
        self.requests.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        if name in self.missing:
            self.send_error(404)
            return
        if name not in self.cut:
            super().do_GET()
            return
        payload = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload[: len(payload) // 2])
        self.wfile.flush()
        self.close_connection = True


Server = Callable[..., tuple[str, list[str]]]


@pytest.fixture(scope="module")
def serve() -> Iterator[Server]:
    """serve(directory, missing=(), cut=()) -> (base URL, list of requested paths); all stopped at the end."""
    servers = []

    def start(directory: Path, missing: tuple[str, ...] = (), cut: tuple[str, ...] = ()) -> tuple[str, list[str]]:
        requests: list[str] = []
        handler = type("Handler", (_Handler,), {"missing": frozenset(missing), "cut": frozenset(cut),
                                                "requests": requests})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}", requests

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def shard_names(shards: Path, split: str | None = None) -> list[str]:
    splits = load_manifest(str(shards))["splits"]
    return [s["name"] for name, info in splits.items() if split in (None, name) for s in info["shards"]]


# 66 train samples / 22 = 3 steps: the test is about where the bytes come from, not about learning.
REMOTE_FIT = (*FIT_ARGS, "--epochs", "1", "--batch-size", "22", "--workers", "2")


@pytest.fixture(scope="module")
def http_run(train_shards: Path, serve: Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A `fit` whose --shards is an http URL; returns (run dir, URL)."""
    base, requests = serve(train_shards.parent)
    url = f"{base}/{train_shards.name}"
    run_dir = tmp_path_factory.mktemp("remote") / "run"
    result = run_cli("train", "fit", "--shards", url, *REMOTE_FIT, "--run-dir", str(run_dir), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    fetched = {path.rsplit("/", 1)[-1] for path in requests}
    assert {"manifest.json", *shard_names(train_shards, "valid"), *shard_names(train_shards, "test")} <= fetched
    assert fetched & set(shard_names(train_shards, "train"))  # (3 steps need only some train shards)
    return run_dir, url


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fit_over_http(http_run: tuple[Path, str], train_shards: Path) -> None:
    run_dir, url = http_run
    manifest = load_manifest(str(train_shards))
    results = json.loads((run_dir / "results.json").read_text())
    for split in ("test", "valid"):
        assert results[split]["num_samples"] == manifest["splits"][split]["num_samples"]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["shards"] == url and info["shard_set"] == shard_set_id(manifest)  # same set as on disk


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_evaluate_over_http(http_run: tuple[Path, str], train_shards: Path, tmp_path: Path) -> None:
    run_dir, url = http_run
    result = run_cli("train", "evaluate", "--checkpoint", str(run_dir), "--shards", url, "--split", "test",
                     "--out", str(tmp_path / "eval"), "--workers", "2", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_samples"] == load_manifest(str(train_shards))["splits"]["test"]["num_samples"]
    results = json.loads((run_dir / "results.json").read_text())  # fit's own test evaluation of the same model
    assert metrics["top1"] == pytest.approx(results["test"]["top1"]) and metrics["loss"] == pytest.approx(
        results["test"]["loss"], rel=1e-4)


def fake_bucket(shards: Path, tmp_path: Path, bucket: str = "bucket") -> tuple[str, dict[str, str]]:
    """Put `shards` at s3://BUCKET/cub/ of a stand-in `aws`; returns (the pipe: location, env with it on PATH)."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "aws").write_text(FAKE_AWS)
    (bin_dir / "aws").chmod(0o755)
    (tmp_path / "s3" / bucket).mkdir(parents=True)
    shutil.copytree(shards, tmp_path / "s3" / bucket / "cub")
    env = {"FAKE_S3": str(tmp_path / "s3"), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return f"pipe:aws s3 cp s3://{bucket}/cub/{{}} -", env


def test_pipe_location_verify_inspect_and_loader(shard_set: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    location, env = fake_bucket(shard_set, tmp_path)
    result = run_cli("pipeline", "verify", location, "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    result = run_cli("pipeline", "inspect", location, env=env)
    assert result.returncode == 0 and "train" in result.stdout, result.stderr

    # What fit/evaluate read: the trainer's loaders over the pipe: location equal those over the directory.
    from train.data import eval_loader

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    manifest = load_manifest(location)

    def keys(where: str) -> list[str]:
        loader = eval_loader(where, manifest, "test", transform=lambda image, seed: image[:4, :4],
                             batch_size=4, workers=2, rank=0, world_size=1)
        return sorted(key for batch in loader for key in batch["key"])

    assert keys(location) == keys(str(shard_set))
    assert len(keys(location)) == manifest["splits"]["test"]["num_samples"]

    victim = shard_names(shard_set, "valid")[0]
    (tmp_path / "s3" / "bucket" / "cub" / victim).unlink()
    result = run_cli("pipeline", "verify", location, "--quiet", env=env)
    assert_one_line_error(result, "1 bad shard(s)")
    assert f"pipe:aws s3 cp s3://bucket/cub/{victim} - (valid): unreadable" in result.stderr
    assert "exit status 1" in result.stderr and "(404)" in result.stderr

    (tmp_path / "s3" / "bucket" / "cub" / "manifest.json").unlink()
    assert_one_line_error(run_cli("pipeline", "inspect", location, env=env), "no shard set at", "exit status 1")
    no_placeholder = "pipe:aws s3 cp s3://bucket/cub/manifest.json -"
    assert_one_line_error(run_cli("pipeline", "inspect", no_placeholder, env=env), "needs {}", "pipe:aws s3 cp")


def test_verify_names_a_shard_cut_mid_transfer(shard_set: Path, serve: Server) -> None:
    victim = shard_names(shard_set, "train")[0]
    base, _ = serve(shard_set.parent, cut=(victim,))
    url = f"{base}/{shard_set.name}"
    result = run_cli("pipeline", "verify", url, "--quiet", timeout=120)
    assert_one_line_error(result, "1 bad shard(s)")
    assert f"{url}/{victim} (train): unreadable" in result.stderr and "transfer cut short" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("failure", "reason"), [("missing", "curl exit 22"), ("cut", "curl exit 18")])
def test_fit_stops_with_one_line_naming_the_url(train_shards: Path, serve: Server, tmp_path: Path, failure: str,
                                                reason: str) -> None:
    broken = tuple(shard_names(train_shards, "train"))  # every train shard: whichever is read first fails
    base, _ = serve(train_shards.parent, **{failure: broken})
    url = f"{base}/{train_shards.name}"
    result = run_cli("train", "fit", "--shards", url, *REMOTE_FIT, "--run-dir", str(tmp_path / "run"), timeout=240)
    line = assert_one_line_error(result, f"cannot read shard {url}/train-", reason, "not retried",
                                 "curl retries only timeouts", "resume with --resume auto")
    assert line.split(f"{url}/", 1)[1].split(":", 1)[0] in broken
