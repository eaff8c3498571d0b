"""bench/recipe.py, the recipe ablation, at a tiny setting: it builds its synthetic set, trains each chosen row
(cumulative: a row carries the options of every row above it, the first is configs/notebook.yaml) at the same
budget, and prints the table and the raw numbers; the rows it runs and bad row names, without training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from support import ONE_THREAD, ROOT, assert_one_line_error, run_python

RECIPE = "bench/recipe.py"


@pytest.mark.slow  # two fits end to end (about 25 s on an idle 2-core VM)
def test_two_rows_train_at_one_budget_and_fill_the_table(tmp_path: Path) -> None:
    work = tmp_path / "work"
    args = ("--classes", "6", "--per-class", "8", "--resize-short", "40", "--image-size", "32", "--batch-size", "8",
            "--epochs", "1", "--workers", "0", "--seeds", "0", "--rows", "notebook,smoothing", "--work", str(work),
            "--json", str(tmp_path / "runs.json"))
    result = run_python(RECIPE, *args, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in result.stdout.splitlines() if re.match(r"\| (notebook|smoothing) \|", line)}
    assert list(rows) == ["notebook", "smoothing"]
    assert rows["notebook"][0] == "`--config configs/notebook.yaml`" and rows["notebook"][-1] == "+0.0"
    assert rows["smoothing"][0] == "`--label-smoothing 0.1`"
    raw = json.loads((tmp_path / "runs.json").read_text())
    assert [row["name"] for row in raw["rows"]] == ["notebook", "smoothing"]
    for row, cells in zip(raw["rows"], rows.values(), strict=True):
        (run,) = row["runs"]
        assert run["seed"] == 0 and 0.0 <= run["top1"] <= 1.0 and run["wall_s"] > 0
        assert cells[1] == f"{100 * run['top1']:.1f}" and cells[2] == "0.0"  # mean of one seed, no spread
    gain = 100 * (raw["rows"][1]["runs"][0]["top1"] - raw["rows"][0]["runs"][0]["top1"])
    assert rows["smoothing"][-1] == f"{gain:+.1f}"
    # Run again over the same --work: the finished fits of the same commands are reused, not trained again.
    results = work / "runs" / "smoothing" / "seed0" / "results.json"
    stamp = results.stat().st_mtime_ns
    again = run_python(RECIPE, *args, env=ONE_THREAD)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout == result.stdout and results.stat().st_mtime_ns == stamp
    # What each run trained with, as the trainer resolved it: the notebook's recipe, the budget over the
    # YAML's model and size, and the last row with every technique above it.
    config = {row: yaml.safe_load((work / "runs" / row / "seed0" / "config.yaml").read_text())
              for row in ("notebook", "smoothing")}
    for resolved in config.values():
        assert (resolved["arch"], resolved["pretrained"], resolved["image_size"], resolved["epochs"],
                resolved["batch_size"]) == ("resnet18", "none", 32, 1, 8)
    assert {k: config["notebook"][k] for k in ("optimizer", "lr", "lr_scheme", "augment", "weight_decay",
                                               "label_smoothing")} == {
        "optimizer": "adam", "lr": 0.001, "lr_scheme": "notebook", "augment": "notebook", "weight_decay": 0.0,
        "label_smoothing": 0.0}
    assert {k: config["smoothing"][k] for k in ("optimizer", "lr", "lr_scheme", "augment", "weight_decay",
                                                "label_smoothing")} == {
        "optimizer": "adamw", "lr": 0.001, "lr_scheme": "flat", "augment": "standard", "weight_decay": 0.05,
        "label_smoothing": 0.1}


def test_first_last_runs_the_notebook_and_fits_defaults() -> None:
    result = run_python(RECIPE, "--first-last", "--dry-run", "--epochs", "3", "--fit-args", "--precision bf16")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["notebook", "defaults"]
    assert "--config configs/notebook.yaml --arch" in lines[0]
    assert "fit --arch resnet18 --pretrained none" in lines[1]  # no recipe option: what fit does by default
    assert all("--epochs 3 --workers 1 --precision bf16 --seed 0" in line and "--wandb disabled" in line
               for line in lines)


def test_an_unknown_row_is_one_line_naming_the_rows(tmp_path: Path) -> None:
    result = run_python(RECIPE, "--rows", "notebook,mixup", "--work", str(tmp_path / "work"))
    assert_one_line_error(result, "unknown row 'mixup'", "notebook, augment")
    assert result.returncode == 2 and not (tmp_path / "work").exists()


def test_fit_defaults_are_the_whole_measured_recipe() -> None:
    """The ablation's last cumulative row, resolved as fit resolves it (configs/notebook.yaml, then the rows'
    options), trains exactly as fit's defaults do: the defaults are the measured recipe."""
    from dataclasses import asdict

    from train import config as cfgmod
    from train.__main__ import build_parser
    from train.optim import resolve_scheme

    result = run_python(RECIPE, "--dry-run", "--seeds", "0")
    assert result.returncode == 0, result.stderr
    rows = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert list(rows)[-1] == "defaults"
    whole = rows[list(rows)[-2]].split()  # `-m train fit OPTIONS`: the last cumulative row
    recipe = cfgmod.make_config(build_parser().parse_args([a if a != "configs/notebook.yaml" else str(ROOT / a)
                                                           for a in whole[2:]]))
    defaults = cfgmod.make_config(build_parser().parse_args(["fit", *rows["defaults"].split()[3:]]))
    recipe_values, default_values = asdict(recipe), asdict(defaults)
    for config, values in ((recipe, recipe_values), (defaults, default_values)):
        values["lr_scheme"] = resolve_scheme(config.lr_scheme, config.pretrained)
    assert recipe_values == default_values
