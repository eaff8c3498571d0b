"""Shard sets read from elsewhere: `fit`, `evaluate`, `verify` and `inspect` over http from loopback
servers (tests/support.py) this module starts, and over `pipe:curl ...` against the same kind of server, the
way object-store CLIs are used. `inspect` prints the same table as for the directory. A shard that answers
404, or whose connection is cut mid-body, stops the command with one line naming the URL or command (and,
for training, the retry policy). `verify`/`inspect` over http with a missing shard or set: test_verify.py."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import FIT_ARGS
from support import LoopbackServer, assert_one_line_error, run_cli, serve

from pipeline.manifest import load_manifest
from train.rundir import shard_set_id

Start = Callable[[Path], LoopbackServer]


@pytest.fixture(scope="module")
def servers() -> Iterator[Start]:
    """start(directory) -> a loopback server over it (support.serve); all stopped when the module ends."""
    with contextlib.ExitStack() as stack:
        yield lambda directory: stack.enter_context(serve(directory))


def shard_names(shards: Path, split: str | None = None) -> list[str]:
    splits = load_manifest(str(shards))["splits"]
    return [s["name"] for name, info in splits.items() if split in (None, name) for s in info["shards"]]


# 66 train samples / 22 = 3 steps: the test is about where the bytes come from, not about learning.
REMOTE_FIT = (*FIT_ARGS, "--epochs", "1", "--batch-size", "22", "--workers", "2")


@pytest.fixture(scope="module")
def http_run(train_shards: Path, servers: Start, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A `fit` whose --shards is an http URL; returns (run dir, URL)."""
    server = servers(train_shards.parent)
    url = f"{server.url}/{train_shards.name}"
    run_dir = tmp_path_factory.mktemp("remote") / "run"
    result = run_cli("train", "fit", "--shards", url, *REMOTE_FIT, "--run-dir", str(run_dir), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    fetched = {path.rsplit("/", 1)[-1] for path in server.requests}
    assert {"manifest.json", *shard_names(train_shards, "valid"), *shard_names(train_shards, "test")} <= fetched
    assert fetched & set(shard_names(train_shards, "train"))  # (3 steps need only some train shards)
    return run_dir, url


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_fit_over_http(http_run: tuple[Path, str], train_shards: Path) -> None:
    run_dir, url = http_run
    manifest = load_manifest(str(train_shards))
    results = json.loads((run_dir / "results.json").read_text())
    for split in ("test", "valid"):
        assert results[split]["num_samples"] == manifest["splits"][split]["num_samples"]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["shards"] == url and info["shard_set"] == shard_set_id(manifest)  # same set as on disk


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_evaluate_over_http(http_run: tuple[Path, str], train_shards: Path, tmp_path: Path) -> None:
    run_dir, url = http_run
    result = run_cli("train", "evaluate", "--checkpoint", str(run_dir), "--shards", url, "--split", "test",
                     "--out", str(tmp_path / "eval"), "--workers", "2", "--no-plots", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_samples"] == load_manifest(str(train_shards))["splits"]["test"]["num_samples"]
    results = json.loads((run_dir / "results.json").read_text())  # fit's own test evaluation of the same model
    assert metrics["top1"] == pytest.approx(results["test"]["top1"]) and metrics["loss"] == pytest.approx(
        results["test"]["loss"], rel=1e-4)


def inspect_table(location: str) -> list[str]:
    """`pipeline inspect LOCATION`'s output, with LOCATION in its first line replaced by "SET"."""
    result = run_cli("pipeline", "inspect", location)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{location}: "), lines[0]
    return [lines[0].replace(location, "SET", 1), *lines[1:]]


def test_inspect_over_http_and_pipe_prints_the_local_table(shard_set: Path, servers: Start) -> None:
    local = inspect_table(str(shard_set))
    assert [line.split()[0] for line in local[2:5]] == ["train", "valid", "test"]
    url = f"{servers(shard_set.parent).url}/{shard_set.name}"
    assert inspect_table(url) == local
    assert inspect_table(f"pipe:curl -sSfL {url}/{{}}") == local


def test_pipe_location_with_a_real_client(shard_set: Path, servers: Start) -> None:
    """`pipe:curl ...` against the loopback server, the way object-store CLIs are used: verify, the trainer's
    loaders, and a 404 for a shard and for the manifest, each named in one line."""
    server = servers(shard_set.parent)
    url = f"{server.url}/{shard_set.name}"
    location = f"pipe:curl -sSfL {url}/{{}}"
    result = run_cli("pipeline", "verify", location, "--quiet")
    assert result.returncode == 0, result.stderr

    # What fit/evaluate read: the trainer's loaders over the pipe: location equal those over the directory,
    # also when the end-of-archive padding arrives after the reader has seen the end of the tar (the reader
    # must read it: curl exits 23 when its output is closed early).
    from train.data import ShardError, eval_loader

    manifest = load_manifest(location)
    server.slow_tail.update(shard_names(shard_set, "test"))

    def keys(where: str) -> list[str]:
        loader = eval_loader(where, manifest, "test", transform=lambda image, seed: image[:4, :4],
                             batch_size=4, workers=2, rank=0, world_size=1)
        return sorted(key for batch in loader for key in batch["key"])

    piped = keys(location)
    assert piped == keys(str(shard_set)) and len(piped) == manifest["splits"]["test"]["num_samples"]

    victim = shard_names(shard_set, "test")[-1]
    server.missing.add(victim)
    with pytest.raises(ShardError) as caught:
        keys(location)
    message = str(caught.value)
    assert f"cannot read shard pipe:curl -sSfL {url}/{victim}: " in message and "\n" not in message
    assert "exit status 22" in message and "404" in message, message

    server.missing.clear()
    victim = shard_names(shard_set, "valid")[0]
    server.missing.add(victim)
    result = run_cli("pipeline", "verify", location, "--quiet")
    assert_one_line_error(result, "1 bad shard(s)")
    (line,) = [line for line in result.stderr.splitlines() if victim in line]
    assert f"pipe:curl -sSfL {url}/{victim} (valid): unreadable" in line
    assert "exit status 22" in line and "404" in line, line

    server.missing.add("manifest.json")
    assert_one_line_error(run_cli("pipeline", "inspect", location), "no shard set at",
                          f"pipe:curl -sSfL {url}/manifest.json", "exit status 22", "404")
    no_placeholder = f"pipe:curl -sSfL {url}/manifest.json"
    assert_one_line_error(run_cli("pipeline", "inspect", no_placeholder), "needs {}", "pipe:curl -sSfL")


def test_verify_names_a_shard_cut_mid_transfer(shard_set: Path, tmp_path: Path) -> None:
    victim = shard_names(shard_set, "train")[0]
    with serve(shard_set.parent) as server:
        server.cut.add(victim)
        url = f"{server.url}/{shard_set.name}"
        result = run_cli("pipeline", "verify", url, "--quiet", timeout=120)
    assert_one_line_error(result, "1 bad shard(s)")
    assert f"{url}/{victim} (train): unreadable" in result.stderr and "transfer cut short" in result.stderr


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("failure", "reason"), [("missing", "curl exit 22"), ("cut", "curl exit 18")])
def test_fit_stops_with_one_line_naming_the_url(train_shards: Path, tmp_path: Path, failure: str,
                                                reason: str) -> None:
    broken = shard_names(train_shards, "train")  # every train shard: whichever is read first fails
    with serve(train_shards.parent) as server:
        getattr(server, failure).update(broken)
        url = f"{server.url}/{train_shards.name}"
        result = run_cli("train", "fit", "--shards", url, *REMOTE_FIT, "--run-dir", str(tmp_path / "run"),
                         timeout=240)
    line = assert_one_line_error(result, f"cannot read shard {url}/train-", reason, "not retried",
                                 "curl retries only timeouts", "resume with --resume auto")
    assert line.split(f"{url}/", 1)[1].split(":", 1)[0] in broken
