"""The run directory in-process: its lock, the choice of the checkpoint to resume from (falling back past
damaged ones), damaged config.yaml / run.json, and what --force may change."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from test_checkpoint import DAMAGE, save_steps

from pipeline.errors import UserError
from pipeline.files import write_json_atomic
from pipeline.lock import holder_path
from train import config as cfgmod
from train import rundir
from train.lifecycle import TRAINER_KEYS

MANIFEST = {"classes": ["a", "b", "c"], "splits": {"train": {"num_samples": 30}}}


def test_lock_refuses_a_second_fit_naming_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with rundir.locked(run):
        with pytest.raises(UserError) as refused, rundir.locked(run):
            pass
        message = str(refused.value)
        assert f"run directory {run} is in use by pid {os.getpid()} on {socket.gethostname()}" in message
    with rundir.locked(run):  # released when the holder is done
        pass


def test_a_dead_holders_record_does_not_block_and_temporaries_go(tmp_path: Path) -> None:
    """A killed fit leaves its holder record (the kernel drops only the flock) and its temporaries."""
    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-step-00000009").mkdir(parents=True)
    (run / ".config.yaml.tmp-123").write_text("lr: 0.")
    write_json_atomic(holder_path(run / rundir.LOCK), {"mode": "exclusive", "info": {}, "host": "gone",
                                                        "pid": 999999, "command": "python -m train fit"})
    with rundir.locked(run):
        assert not (run / "checkpoints" / ".tmp-step-00000009").exists()
        assert not (run / ".config.yaml.tmp-123").exists()
        assert json.loads(holder_path(run / rundir.LOCK).read_text())["pid"] == os.getpid()


def make_run(tmp_path: Path, steps: list[int], **changes: object) -> tuple[Path, cfgmod.Config]:
    """A run directory as fit leaves it: config.yaml, run.json and real checkpoints at `steps`."""
    run = tmp_path / "run"
    config = cfgmod.Config(shards="s", run_dir=str(run), epochs=5, lr=0.01)
    run.mkdir(parents=True)
    cfgmod.save(config, run / "config.yaml")
    rundir.write_run_info(config, MANIFEST, resuming=False)
    if steps:
        save_steps(None, run, steps)
    return run, dataclasses.replace(config, resume="auto", **changes)


def test_fresh_start_and_refusals(tmp_path: Path) -> None:
    run, config = make_run(tmp_path, [])
    assert rundir.resume_point(config, MANIFEST, TRAINER_KEYS) == rundir.Start()  # no checkpoint: fresh
    save_steps(None, run, [3])
    with pytest.raises(UserError, match="already holds a run with checkpoints; pass --resume auto"):
        rundir.resume_point(dataclasses.replace(config, resume=""), MANIFEST, TRAINER_KEYS)
    start = rundir.resume_point(config, MANIFEST, TRAINER_KEYS)
    assert start.checkpoint == run / "checkpoints" / "step-00000003" and start.state["global_step"] == 3

    rows = [  # (config changes, force, error fragment or None)
        ({"lr": 0.02}, False, "config differs in lr, which --force cannot change (it can change epochs and the "
                              "shard set)"),
        ({"lr": 0.02, "arch": "resnet18"}, True, "config differs in arch, lr, which --force cannot change"),
        ({"batch_size": 8, "grad_accum": 3}, False, None),  # the engine keeps the global batch (test_elastic)
        ({"epochs": 7}, False, "config differs in epochs (pass --force to resume anyway)"),
        ({"epochs": 7}, True, None),
        ({"workers": 0, "shards": "elsewhere", "keep_checkpoints": 5}, False, None),
    ]
    for changes, force, fragment in rows:
        changed = dataclasses.replace(config, force=force, **changes)
        if fragment is None:
            assert rundir.resume_point(changed, MANIFEST, TRAINER_KEYS).checkpoint == start.checkpoint
        else:
            with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
                rundir.resume_point(changed, MANIFEST, TRAINER_KEYS)

    other_set = {**MANIFEST, "splits": {"train": {"num_samples": 40}}}
    with pytest.raises(UserError, match=r"another shard set \(pass --force"):
        rundir.resume_point(config, other_set, TRAINER_KEYS)
    assert rundir.resume_point(dataclasses.replace(config, force=True), other_set, TRAINER_KEYS).checkpoint
    with pytest.raises(UserError, match="the shard set has other classes than the run's"):
        rundir.resume_point(dataclasses.replace(config, force=True), {**MANIFEST, "classes": ["a", "b", "x"]},
                            TRAINER_KEYS)


def test_damaged_config_and_run_info_are_one_error_naming_the_file(tmp_path: Path) -> None:
    run, config = make_run(tmp_path, [3])
    saved = {name: (run / name).read_bytes() for name in ("config.yaml", "run.json")}
    rows = [
        ("config.yaml", b"lr: [0.01\n", "config.yaml is damaged (while parsing a flow sequence"),
        ("config.yaml", b"- just\n- a list\n", "config.yaml is damaged (not a mapping of option: value)"),
        ("config.yaml", b"\xff\xfe\x00garbage", "config.yaml is damaged"),
        ("config.yaml", None, "config.yaml is missing"),
        ("run.json", b'{"shard_set": "ab', "run.json is damaged (Unterminated string"),
        ("run.json", b"[1, 2]", "run.json is damaged (not a JSON object)"),
    ]
    for name, content, fragment in rows:
        if content is None:
            (run / name).unlink()
        else:
            (run / name).write_bytes(content)
        for forced in (False, True):
            with pytest.raises(UserError) as failed:
                rundir.resume_point(dataclasses.replace(config, force=forced), MANIFEST, TRAINER_KEYS)
            assert str(run / name) in str(failed.value) and fragment in str(failed.value), str(failed.value)
        (run / name).write_bytes(saved[name])
    assert rundir.resume_point(config, MANIFEST, TRAINER_KEYS).checkpoint is not None


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tmp_path: Path) -> None:
    run, config = make_run(tmp_path, [3, 6, 9])
    folder = run / "checkpoints"
    (folder / "step-old").mkdir()  # a stray directory a user made: ignored
    shutil.copy(folder / "step-00000009" / "trainer.json", folder / "step-old" / "trainer.json")
    pristine = Path(shutil.copytree(folder, tmp_path / "pristine"))
    for damage, problem in DAMAGE:
        damage(folder / "step-00000009")
        start = rundir.resume_point(config, MANIFEST, TRAINER_KEYS)
        assert start.checkpoint == folder / "step-00000006" and start.state["global_step"] == 6
        assert len(start.skipped) == 1 and start.skipped[0].startswith(
            f"warning: skipping checkpoint {folder / 'step-00000009'}: ") and problem in start.skipped[0]
        shutil.rmtree(folder / "step-00000009")
        shutil.copytree(pristine / "step-00000009", folder / "step-00000009")

    DAMAGE[0][0](folder / "step-00000009")
    DAMAGE[2][0](folder / "step-00000006")
    start = rundir.resume_point(config, MANIFEST, TRAINER_KEYS)
    assert start.checkpoint == folder / "step-00000003" and len(start.skipped) == 2
    DAMAGE[6][0](folder / "step-00000003")
    with pytest.raises(UserError) as failed:
        rundir.resume_point(config, MANIFEST, TRAINER_KEYS)
    assert str(failed.value).startswith(f"cannot resume {run}: none of its 3 checkpoint(s) loads (newest, "
                                        "step-00000009: model.safetensors is truncated")


def test_auto_lr_reuses_the_saved_choice_and_names_a_damaged_config(tmp_path: Path) -> None:
    run, config = make_run(tmp_path, [3], lr="auto")
    assert rundir.resolve_auto_lr(config).lr == 0.01
    assert config.lr == "auto"  # a new config: the resolved one is never changed
    (run / "config.yaml").write_text("lr: [")
    with pytest.raises(UserError, match="config.yaml is damaged"):
        rundir.resolve_auto_lr(dataclasses.replace(config, lr="auto"))


def test_metrics_kept_on_resume_drop_a_partial_line_and_the_old_test_record(tmp_path: Path) -> None:
    from train.tracking import kept_records

    records = [{"kind": "step", "step": 1}, {"kind": "step", "step": 2}, {"kind": "epoch", "step": 2},
               {"kind": "step", "step": 3}, {"kind": "test", "step": 3}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "step", "st')
    assert kept_records(path, 2) == records[:3]
    assert kept_records(path, 3) == records[:4]  # an earlier ending's test record: the run writes its own
    assert kept_records(tmp_path / "none.jsonl", 3) == []
