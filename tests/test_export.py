"""export: TorchScript and ONNX files that reload and give the checkpoint's logits, meta inside."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support import ONE_THREAD, assert_one_line_error, run_cli, run_main

from pipeline.errors import UserError
from train import checkpoint, export


def _reference(run: Path, batch: int = 3) -> tuple[torch.Tensor, np.ndarray, dict]:
    model, meta = checkpoint.load_model(run)
    size = meta["image_size"]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return x, model(x).numpy(), meta


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_cli_round_trip(fitted_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    result = run_cli("train", "export", "--checkpoint", str(fitted_run), "--format", "torchscript", "--out",
                     str(out), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "max abs logit difference" in result.stdout
    x, expected, meta = _reference(fitted_run)
    extra = {"meta.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["meta.json"])["classes"] == meta["classes"]
    with torch.no_grad():
        assert np.abs(loaded(x).numpy() - expected).max() < 1e-4


def test_onnx_round_trip_with_meta(fitted_run: Path, tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "model.onnx"
    assert export.export(str(fitted_run), "onnx", out)[1] <= export.TOLERANCE
    x, expected, meta = _reference(fitted_run)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props[export.META_KEY])["image_size"] == meta["image_size"]
    assert np.abs(export.run_onnx(out, x) - expected).max() < 1e-4  # batch of 3: dynamic batch axis
    assert not list(tmp_path.glob("*.data"))  # one self-contained file


def test_export_of_a_non_run_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    result = run_main(capsys, "export", "--checkpoint", str(tmp_path / "nope"), "--format", "onnx", "--out",
                      str(tmp_path / "m.onnx"))
    assert_one_line_error(result, "no such run directory")
    result = run_main(capsys, "export", "--checkpoint", str(tmp_path), "--format", "tflite", "--out", "m")
    assert result.returncode == 2 and "invalid choice" in result.stderr


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_nothing_half_written(fitted_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file appears at --out only once written and checked; a failed check leaves an older file as it
    was and no temporary file; a target that is not a regular file in a writable folder is refused."""
    out = tmp_path / "model.pt"
    out.write_bytes(b"an older export")
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # every check fails
    with pytest.raises(UserError, match="export check failed: .* nothing written"):
        export.export(str(fitted_run), "torchscript", out)
    assert out.read_bytes() == b"an older export" and sorted(tmp_path.iterdir()) == [out]
    monkeypatch.undo()
    assert export.export(str(fitted_run), "torchscript", out)[1] <= export.TOLERANCE
    assert sorted(tmp_path.iterdir()) == [out] and out.read_bytes()[:2] == b"PK"  # a TorchScript zip
    for target, message in ((tmp_path, "is a directory"), (Path("/dev/full"), "not a regular file"),
                            (Path("/sys/model.pt"), "cannot write in /sys")):
        with pytest.raises(UserError, match=message):
            export.export(str(fitted_run), "torchscript", target)


class _Untraceable(torch.nn.Module):
    """Data-dependent control flow (torch.cond), which torch.jit.trace refuses and ONNX keeps as an If node."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x.mean((2, 3))
        return torch.cond(features.sum() > 0, lambda t: self.fc(t) * 2, lambda t: self.fc(-t), (features,))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning", "ignore::torch.jit.TracerWarning")
def test_auto_falls_back_to_onnx_when_the_model_does_not_trace(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    from train import commands

    torch.manual_seed(0)
    model, meta = _Untraceable().eval(), {"image_size": 8, "classes": [str(i) for i in range(5)]}
    monkeypatch.setattr(checkpoint, "load_model", lambda run: (model, meta))
    with pytest.raises(RuntimeError, match="trace"):  # what auto meets first
        export.export_torchscript(model, export.check_batch(meta, 2), meta, tmp_path / "traced.pt")
    out = tmp_path / "model.export"  # a name that names no format
    assert commands.export(str(tmp_path / "run"), "auto", out) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (onnx); reloaded: max abs logit difference")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.export"]  # no temporaries, no TorchScript
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props[export.META_KEY]) == meta
    for x in (export.check_batch(meta, 3), -export.check_batch(meta, 3)):  # both branches, another batch size
        with torch.no_grad():
            assert np.abs(export.run_onnx(out, x) - model(x).numpy()).max() < 1e-5


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning", "ignore::torch.jit.TracerWarning")
def test_auto_follows_the_suffix_of_out(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--format auto with an .onnx name writes ONNX even for a model that traces (never TorchScript under an
    .onnx name), and with a .pt name TorchScript only: a model that cannot trace is then an error, not an ONNX
    file under a TorchScript name."""
    torch.manual_seed(0)
    meta = {"image_size": 8, "classes": [str(i) for i in range(5)]}
    traceable = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5)).eval()
    monkeypatch.setattr(checkpoint, "load_model", lambda run: (traceable, meta))
    assert export.export(str(tmp_path / "run"), "auto", tmp_path / "m.ONNX")[0] == "onnx"
    assert export.run_onnx(tmp_path / "m.ONNX", export.check_batch(meta, 3)).shape == (3, 5)
    assert export.export(str(tmp_path / "run"), "auto", tmp_path / "m.pt")[0] == "torchscript"
    monkeypatch.setattr(checkpoint, "load_model", lambda run: (_Untraceable().eval(), meta))
    with pytest.raises(UserError, match="the model does not trace to TorchScript .*; export it as ONNX"):
        export.export(str(tmp_path / "run"), "auto", tmp_path / "u.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ONNX", "m.pt"]
