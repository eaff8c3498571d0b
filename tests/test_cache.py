"""The local shard cache (`--cache-dir`): remote shards fetched once per node, counted as GETs on loopback
servers (tests/support.py). A 3-epoch fit fetches each shard at most once and a second fit none; a cached
copy that changed is fetched again and never read; a killed fetch is recovered; the limit evicts the least
recently used shards but never one in use; processes sharing a cold cache fetch each shard once; local sets
are never copied."""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIT_ARGS
from support import assert_one_line_error, cli_env, run_cli, run_main, serve, wait_for

from pipeline.manifest import load_manifest
from train.data import cache as shard_cache
from train.data.shards import Shard, ShardError, read_shard, train_shards

# 66 train samples / 22 = 3 steps an epoch: the test is about where the bytes come from, not learning.
CACHED_FIT = (*FIT_ARGS, "--epochs", "3", "--batch-size", "22", "--workers", "0")


def tar_gets(server: object) -> collections.Counter[str]:
    return collections.Counter(path.rsplit("/", 1)[-1] for path in server.requests if path.endswith(".tar"))


def shard_list(location: str, shards: Path) -> list[Shard]:
    return train_shards(location, load_manifest(str(shards)))


def read_keys(shard: Shard) -> list[str]:
    return [sample["__key__"] for sample in read_shard(shard)]


@pytest.fixture
def served(train_shards: Path) -> object:
    with serve(train_shards) as server:
        yield server


@pytest.fixture
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv(shard_cache.CACHE_DIR_ENV, str(directory))
    monkeypatch.delenv(shard_cache.CACHE_LIMIT_ENV, raising=False)
    return directory


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_fits_over_http_fetch_each_shard_once_per_node(train_shards: Path, served: object, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = run_cli("train", "fit", "--shards", served.url, *CACHED_FIT, "--cache-dir", str(cache),
                    "--run-dir", str(tmp_path / "run1"), timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    gets = tar_gets(served)
    manifest = load_manifest(str(train_shards))
    every = {s["name"] for info in manifest["splits"].values() for s in info["shards"]}
    assert set(gets) == every  # 3 epochs of train and valid, and test: each shard once
    assert max(gets.values()) == 1
    assert sorted(p.name for p in cache.glob("*.tar")) == sorted(
        f"{s['sha256']}.tar" for info in manifest["splits"].values() for s in info["shards"])
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]

    served.log.clear()  # a second run on the warm cache, taking it from the environment
    second = run_cli("train", "fit", "--shards", served.url, *CACHED_FIT, "--run-dir", str(tmp_path / "run2"),
                     env={shard_cache.CACHE_DIR_ENV: str(cache)}, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert tar_gets(served) == {}
    assert served.requests == ["/manifest.json"]


@pytest.mark.e2e
def test_evaluate_reads_through_the_cache(fitted_run: Path, train_shards: Path, served: object, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    test_shards = {s["name"] for s in load_manifest(str(train_shards))["splits"]["test"]["shards"]}
    for turn in range(2):
        result = run_cli("train", "evaluate", "--checkpoint", str(fitted_run), "--shards", served.url, "--split",
                         "test", "--out", str(tmp_path / f"eval{turn}"), "--workers", "0", "--cache-dir", str(cache),
                         "--no-plots", timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        assert tar_gets(served) == {name: 1 for name in test_shards}  # the second turn added none
        assert len(list(cache.glob("*.tar"))) == len(test_shards)


def test_changed_cached_copy_is_fetched_again_never_read(train_shards: Path, served: object, cache_env: Path) -> None:
    shard = shard_list(served.url, train_shards)[0]
    expected = read_keys(Shard(str(train_shards / shard.url.rsplit("/", 1)[-1]), shard.num_samples, shard.sha256))
    assert read_keys(shard) == expected
    copy = cache_env / f"{shard.sha256}.tar"
    good = copy.read_bytes()
    data = bytearray(good)
    data[600] ^= 0xFF  # inside the first member's payload: the tar still parses
    copy.write_bytes(bytes(data))
    assert read_keys(shard) == expected
    assert tar_gets(served)[shard.url.rsplit("/", 1)[-1]] == 2
    assert copy.read_bytes() == good
    assert read_keys(shard) == expected  # and from the repaired copy without another GET
    assert sum(tar_gets(served).values()) == 2


def test_a_shard_whose_source_differs_from_the_manifest_is_not_cached(train_shards: Path, served: object,
                                                                      cache_env: Path) -> None:
    shard = shard_list(served.url, train_shards)[1]
    wrong = Shard(shard.url, shard.num_samples, "0" * 64)
    with pytest.raises(ShardError, match="do not match the manifest's sha256"):
        read_keys(wrong)
    assert not list(cache_env.glob("*.tar"))
    assert not [p for p in cache_env.iterdir() if ".tmp-" in p.name]


FETCHER = """
import sys
from pathlib import Path
from train.data.cache import ShardCache
with ShardCache(Path(sys.argv[1])).open(sys.argv[2], sys.argv[3]) as f:
    pass
"""


def test_a_killed_fetch_is_recovered(train_shards: Path, served: object, cache_env: Path) -> None:
    shard = shard_list(served.url, train_shards)[2]
    name = shard.url.rsplit("/", 1)[-1]
    served.stall.add(name)  # the fetch gets 16 bytes, then nothing: killed mid-transfer, holding its lock
    fetcher = subprocess.Popen([sys.executable, "-c", FETCHER, str(cache_env), shard.url, shard.sha256],
                               env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        temporary = cache_env / f".{shard.sha256}.tar.tmp-{fetcher.pid}"
        wait_for(lambda: temporary.exists() and f"/{name}" in served.requests, 60, "the fetch to start")
    finally:
        os.kill(fetcher.pid, signal.SIGKILL)
        fetcher.wait()
    assert temporary.exists()  # what the killed fetch left, under a name that never looks complete
    assert not (cache_env / f"{shard.sha256}.tar").exists()
    served.stall.discard(name)
    assert len(read_keys(shard)) == shard.num_samples
    assert not temporary.exists()
    assert tar_gets(served)[name] == 2
    assert (cache_env / f"{shard.sha256}.tar").is_file()


def test_the_limit_evicts_the_least_recently_used_never_a_shard_in_use(train_shards: Path, served: object,
                                                                       cache_env: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    shards = shard_list(served.url, train_shards)[:4]
    size = max((train_shards / s.url.rsplit("/", 1)[-1]).stat().st_size for s in shards)
    monkeypatch.setenv(shard_cache.CACHE_LIMIT_ENV, f"{2.5 * size / shard_cache.GB:.12f}")  # room for two
    cache = shard_cache.current()
    for shard in shards[:3]:
        read_keys(shard)
    cached = {p.name for p in cache_env.glob("*.tar")}
    assert cached == {f"{s.sha256}.tar" for s in shards[1:3]}
    with cache.open(shards[1].url, shards[1].sha256):  # in use while shard 3 is fetched: kept; 2 goes
        read_keys(shards[3])
    assert {p.name for p in cache_env.glob("*.tar")} == {f"{s.sha256}.tar" for s in (shards[1], shards[3])}
    read_keys(shards[0])  # evicted earlier: fetched again
    assert tar_gets(served)[shards[0].url.rsplit("/", 1)[-1]] == 2


def _read_all(location: str, shards: list[Shard]) -> int:
    return sum(len(read_keys(shard)) for shard in shards)


def test_processes_sharing_a_cold_cache_fetch_each_shard_once(train_shards: Path, served: object,
                                                              cache_env: Path) -> None:
    shards = shard_list(served.url, train_shards)
    with multiprocessing.get_context("fork").Pool(3) as pool:
        counts = pool.starmap(_read_all, [(served.url, shards)] * 3)
    assert counts == [sum(s.num_samples for s in shards)] * 3
    assert tar_gets(served) == {s.url.rsplit("/", 1)[-1]: 1 for s in shards}


def test_pipe_locations_are_cached_too(train_shards: Path, cache_env: Path) -> None:
    shard = shard_list(str(train_shards), train_shards)[0]
    piped = Shard(f"pipe:cat {shard.url}", shard.num_samples, shard.sha256)
    assert read_keys(piped) == read_keys(shard)
    assert [p.name for p in cache_env.glob("*.tar")] == [f"{shard.sha256}.tar"]


def test_local_sets_are_never_copied(train_shards: Path, cache_env: Path) -> None:
    shard = shard_list(str(train_shards), train_shards)[0]
    assert len(read_keys(shard)) == shard.num_samples
    assert not cache_env.exists() or not any(cache_env.iterdir())


def test_an_unusable_cache_dir_is_one_line(train_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(shard_cache.CACHE_DIR_ENV, "")  # restored afterwards: the command sets it in-process
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_main(capsys, "fit", "--shards", str(train_shards), "--cache-dir", str(blocker), "--run-dir",
                      str(tmp_path / "run"))
    assert_one_line_error(result, "--cache-dir", "not a directory")
    assert not (tmp_path / "run").exists()
