"""Hostile or unlucky pipeline inputs through the real CLI. Every row: a non-zero exit, exactly one `error:`
line naming the problem, no traceback, and nothing left that a later command would take as complete (no
manifest.json, no shard, and a read-only command changes nothing). Two builds into one --out at once are a
separate test with real concurrent processes."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import procs
import pytest
from conftest import SMALL_OPTIONS
from support import assert_one_line_error, cli_env, run_cli

from pipeline.lock import read_holder


@dataclass(frozen=True)
class Case:
    """`tmp`: the row's directory; `source`: the synth CUB_200_2011; `shards`: a copy of a complete set."""

    tmp: Path
    source: Path
    shards: Path


def _build(case: Case, out: Path, *extra: str) -> list[str]:
    return ["build", "--source", str(case.source), "--out", str(out), "--resize-short", "96", "--shard-samples", "7",
            "--workers", "1", "--quiet", *extra]


def _unmerged(case: Case) -> Path:
    """The complete set without its manifest: what merge sees after the jobs."""
    (case.shards / "manifest.json").unlink()
    return case.shards


def _edit_json(path: Path, edit: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_manifest(case: Case, edit: Callable[[dict], object]) -> list[str]:
    _edit_json(case.shards / "manifest.json", edit)
    return [str(case.shards)]


def _out_is_a_file(case: Case) -> list[str]:
    (case.tmp / "out").write_text("not a directory")
    return _build(case, case.tmp / "out")


def _out_under_a_file(case: Case) -> list[str]:
    (case.tmp / "file").write_text("x")
    return _build(case, case.tmp / "file" / "sub" / "out")


def _garbage_state_for_build(case: Case) -> list[str]:
    (case.shards / ".build" / "build.json").write_bytes(b"\x00\xffgarbage")
    (case.shards / "manifest.json").unlink()
    return _build(case, case.shards)


def _garbage_state_for_merge(case: Case) -> list[str]:
    (_unmerged(case) / ".build" / "build.json").write_text("{\"options\": ")
    return ["merge", str(case.shards)]


def _state_is_a_list(case: Case) -> list[str]:
    (_unmerged(case) / ".build" / "build.json").write_text("[1, 2]")
    return ["merge", str(case.shards)]


def _state_plan_wrong(case: Case) -> list[str]:
    _edit_json(_unmerged(case) / ".build" / "build.json", lambda s: s["plan"].update(train="train-000000.tar"))
    return ["merge", str(case.shards)]


def _record_missing_key(case: Case) -> list[str]:
    _edit_json(_unmerged(case) / ".build" / "train-000001.tar.json", lambda r: r.pop("sha256"))
    return ["merge", str(case.shards)]


def _record_wrong_type(case: Case) -> list[str]:
    _edit_json(_unmerged(case) / ".build" / "valid-000000.tar.json", lambda r: r.update(bytes="51200"))
    return ["merge", str(case.shards)]


def _record_garbage(case: Case) -> list[str]:
    (_unmerged(case) / ".build" / "test-000002.tar.json").write_text("[")
    return ["merge", str(case.shards)]


def _record_class_counts_short(case: Case) -> list[str]:
    _edit_json(_unmerged(case) / ".build" / "test-000000.tar.json", lambda r: r.update(class_counts=[7]))
    return ["merge", str(case.shards)]


def _odd_marker(name: str) -> Callable[[Case], list[str]]:
    def setup(case: Case) -> list[str]:
        (_unmerged(case) / ".build" / name).write_text("{}")
        return ["merge", str(case.shards)]
    return setup


def _merge_nothing(case: Case) -> list[str]:
    (case.tmp / "empty").mkdir()
    return ["merge", str(case.tmp / "empty")]


def _shard_listed_twice(case: Case) -> list[str]:
    return ["verify", *_edit_manifest(case, lambda m: m["splits"]["test"]["shards"].append(
        m["splits"]["train"]["shards"][0])), "--quiet"]


def _field(split: str, key: str, value: object) -> Callable[[dict], object]:
    return lambda m: m["splits"][split]["shards"][0].update({key: value})


ROWS: list[tuple[str, Callable[[Case], list[str]], tuple[str, ...]]] = [
    ("build --out is a file", _out_is_a_file, ("out: exists and is not a directory",)),
    ("build --out under a file", _out_under_a_file, ("file is not a directory",)),
    ("build --workers -1", lambda c: _build(c, c.tmp / "o", "--workers", "-1"), ("--workers must be >= 0",)),
    ("build --num-jobs 0", lambda c: _build(c, c.tmp / "o", "--num-jobs", "0"), ("--num-jobs must be >= 1",)),
    ("build --job-index -1", lambda c: _build(c, c.tmp / "o", "--num-jobs", "2", "--job-index", "-1"),
     ("--job-index must be in 0..1",)),
    ("build --resize-short -1", lambda c: _build(c, c.tmp / "o", "--resize-short", "-1"), ("--resize-short",)),
    ("build --valid-fraction nan", lambda c: _build(c, c.tmp / "o", "--valid-fraction", "nan"),
     ("--valid-fraction must be in [0, 1)",)),
    ("build --quality 101", lambda c: _build(c, c.tmp / "o", "--quality", "101"), ("--quality must be in 1..100",)),
    ("build --workers two", lambda c: _build(c, c.tmp / "o", "--workers", "two"),
     ("argument --workers: invalid int value: 'two'",)),
    ("build --source missing", lambda c: ["build", "--source", str(c.tmp / "nope"), "--out", str(c.tmp / "o")],
     ("nope: no such file or directory",)),
    ("build over a garbage build.json", _garbage_state_for_build, ("build.json: not a readable build record",
                                                                   "--overwrite")),
    ("merge garbage build.json", _garbage_state_for_merge, ("build.json: not a readable build state",)),
    ("merge build.json is a list", _state_is_a_list, ("build.json: not a readable build state",)),
    ("merge build.json plan wrong", _state_plan_wrong, ("plan of 'train' is not a list of shard file names",)),
    ("merge record missing sha256", _record_missing_key, ("train-000001.tar.json: malformed shard record "
                                                          "(missing sha256)",)),
    ("merge record bytes a string", _record_wrong_type, ("valid-000000.tar.json: malformed shard record",)),
    ("merge record not JSON", _record_garbage, ("test-000002.tar.json: unreadable shard record",)),
    ("merge record class_counts short", _record_class_counts_short, ("test-000000.tar.json: malformed shard record",
                                                                     "6 classes")),
    ("merge odd marker name", _odd_marker("job-abc-of-003.json"), ("job-abc-of-003.json: not a part marker",)),
    ("merge marker index past total", _odd_marker("job-005-of-003.json"), ("job-005-of-003.json: not a part",)),
    ("merge where nothing was built", _merge_nothing, ("no build state",)),
    ("verify a shard listed twice", _shard_listed_twice, ("shard 'train-000000.tar' is listed twice (in train and "
                                                          "test)",)),
    ("verify num_samples a string", lambda c: ["verify", *_edit_manifest(c, lambda m: m["splits"]["valid"].update(
        num_samples="6"))], ("split 'valid' num_samples must be an integer >= 0, got '6'",)),
    ("inspect num_samples a string", lambda c: ["inspect", *_edit_manifest(c, _field("train", "num_samples", "7"))],
     ("train shard 0 (train-000000.tar): num_samples must be an integer >= 0, got '7'",)),
    ("inspect classes not names", lambda c: ["inspect", *_edit_manifest(c, lambda m: m.update(classes=[1, 2]))],
     ("'classes' must be a non-empty list of names",)),
    ("verify sha256 a number", lambda c: ["verify", *_edit_manifest(c, _field("test", "sha256", 5))],
     ("sha256 must be 64 lowercase hex digits, got 5",)),
    ("inspect bytes null", lambda c: ["inspect", *_edit_manifest(c, _field("test", "bytes", None))],
     ("bytes must be an integer >= 0, got None",)),
    ("verify shard name with a path", lambda c: ["verify", *_edit_manifest(c, _field("train", "name", "../x.tar"))],
     ("shard name '../x.tar' is not a plain file name",)),
    ("inspect class_counts short", lambda c: ["inspect", *_edit_manifest(c, lambda m: m["splits"]["test"].update(
        class_counts=[1]))], ("split 'test' class_counts must be 6 integers",)),
    ("inspect skipped not a list", lambda c: ["inspect", *_edit_manifest(c, lambda m: m.update(skipped="none"))],
     ("'skipped' must be a list",)),
    ("verify a file, not a set", lambda c: ["verify", str(c.shards / "train-000000.tar")], ("no shard set at",)),
]


def _tree(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("setup", "fragments"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_hostile_input_is_one_line(setup: Callable[[Case], list[str]], fragments: tuple[str, ...],
                                   cub_source: Path, shard_set: Path, tmp_path: Path) -> None:
    case = Case(tmp_path, cub_source / "CUB_200_2011", Path(shutil.copytree(shard_set, tmp_path / "set")))
    argv = setup(case)
    read_only = argv[0] in ("verify", "inspect")
    before = _tree(tmp_path)
    result = run_cli("pipeline", *argv)
    assert_one_line_error(result, *fragments)
    after = _tree(tmp_path)
    if read_only:
        assert after == before
    else:  # nothing complete-looking appeared or changed: no manifest, no shard written
        new_or_changed = {p for p in after if before.get(p) != after[p]}
        assert not {p for p in new_or_changed if p.endswith((".tar", "manifest.json"))}, new_or_changed
        assert not (Path(argv[argv.index("--out") + 1] if "--out" in argv else argv[1]) / "manifest.json").exists()


# ---------------------------------------------------------------- two builds into one --out at once


def _decision_free(lock: Path) -> bool:
    with open(lock.with_name(lock.name + ".meta"), "a") as meta:
        try:
            fcntl.flock(meta, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True  # closing releases it at once


def _stop_while_holding(proc, out: Path) -> None:
    """SIGSTOP a build once it holds the lock on `out` (and is not in the middle of taking or dropping it)."""
    lock = out / ".build" / "lock"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the build finished before it could be stopped"
        holder = read_holder(lock)
        if holder and holder["pid"] == proc.pid:
            os.kill(proc.pid, signal.SIGSTOP)
            time.sleep(0.05)
            holder = read_holder(lock)
            if holder and holder["pid"] == proc.pid and _decision_free(lock):
                return
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError("the build never held the lock")


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def _command(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "build", "--source", str(source), "--out", str(out),
            "--resize-short", str(SMALL_OPTIONS.resize_short), "--shard-samples", str(SMALL_OPTIONS.shard_samples),
            "--workers", "1", "--quiet", *extra]


def test_a_second_build_or_merge_is_refused_while_a_build_runs(cub_source: Path, shard_set: Path,
                                                                tmp_path: Path) -> None:
    source, out = cub_source / "CUB_200_2011", tmp_path / "out"
    with procs.group(tmp_path / "logs") as group:
        first = group.start("first", _command(source, out), cli_env())
        _stop_while_holding(first, out)
        holder = f"{out} is in use by pid {first.pid} on "
        other = run_cli("pipeline", *_command(source, out, "--quality", "60")[3:])
        assert_one_line_error(other, holder, "options.quality=95 (here 60)", "wait for it to finish")
        assert_one_line_error(run_cli("pipeline", *_command(source, out)[3:]), holder, "with the same settings")
        assert_one_line_error(run_cli("pipeline", "merge", str(out)), holder)
        os.kill(first.pid, signal.SIGCONT)
        assert group.finish(120) == [0], group.output("first")
    assert _digests(out) == _digests(shard_set)  # only the first build's bytes, manifest included
    assert run_cli("pipeline", "verify", str(out), "--quiet").returncode == 0


def test_jobs_of_one_build_share_the_out_and_nothing_else_does(cub_source: Path, shard_set: Path,
                                                                tmp_path: Path) -> None:
    source, out = cub_source / "CUB_200_2011", tmp_path / "out"
    with procs.group(tmp_path / "logs") as group:
        job0 = group.start("job0", _command(source, out, "--num-jobs", "2", "--job-index", "0"), cli_env())
        _stop_while_holding(job0, out)
        job1 = run_cli("pipeline", *_command(source, out, "--num-jobs", "2", "--job-index", "1")[3:])
        assert job1.returncode == 0, job1.stderr  # the same build's other job runs meanwhile
        holder = f"{out} is in use by pid {job0.pid} on "
        assert_one_line_error(run_cli("pipeline", *_command(source, out, "--num-jobs", "2", "--job-index", "1",
                                                            "--quality", "60")[3:]),
                              holder, "options.quality=95 (here 60)")
        assert_one_line_error(run_cli("pipeline", *_command(source, out, "--num-jobs", "3", "--job-index", "1")[3:]),
                              holder, "num_jobs=2 (here 3)")
        assert_one_line_error(run_cli("pipeline", "merge", str(out)), holder)
        os.kill(job0.pid, signal.SIGCONT)
        assert group.finish(120) == [0], group.output("job0")
    assert not (out / "manifest.json").exists()
    merged = run_cli("pipeline", "merge", str(out))
    assert merged.returncode == 0, merged.stderr
    assert _digests(out) == _digests(shard_set)
