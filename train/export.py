"""`export`: a run's best model as TorchScript or ONNX, checked by reloading it and comparing logits.

The exported model takes a float32 N x 3 x S x S batch (S = the run's eval image size), already normalised
with the run's mean/std, and returns N x C logits; the batch dimension is dynamic. The run's meta (classes,
image sizes, mean, std, eval transform, TTA) travels inside the file: TorchScript `_extra_files["meta.json"]`,
ONNX `metadata_props` key "cubstream_meta". The file is the plain model: a run's test-time augmentation
(meta "tta": "flip" = the mean of the logits of the image and of its horizontal mirror) is the caller's to apply.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import UserError, one_line
from pipeline.files import atomic_path
from pipeline.outputs import output_file_problem
from train import augment, checkpoint, names

FORMATS = names.EXPORT_FORMATS  # auto: the --out suffix's format; else TorchScript if it traces, else ONNX
SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript"}
META_KEY = "cubstream_meta"
TOLERANCE = 1e-3  # max abs logit difference accepted (float32, different kernels)
CHECK_BATCH = 4


class WriteFailed(UserError):
    """The export could not be written (disk full, permissions): trying another format would not help."""


def check_batch(meta: dict[str, Any], batch: int = CHECK_BATCH) -> torch.Tensor:
    """A fixed, normalised-looking input batch for the round-trip check."""
    size = augment.eval_size(meta)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, meta: dict[str, Any], out: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit is deprecated, still supported
        # torch's own trace check re-traces and compares graphs, which fails on some models (a ViT's) for
        # names alone; the reloaded export is compared with the checkpoint's logits instead (_check).
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={"meta.json": json.dumps(meta)})


def run_torchscript(path: Path, batch: torch.Tensor) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return loaded(batch).numpy()


def export_onnx(model: torch.nn.Module, example: torch.Tensor, meta: dict[str, Any], out: Path) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(model, (example,), str(out), input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), external_data=False, verbose=False)  # any forward arg name
    exported = onnx.load(str(out))
    onnx.helper.set_model_props(exported, {META_KEY: json.dumps(meta)})
    onnx.save(exported, str(out))


def run_onnx(path: Path, batch: torch.Tensor) -> np.ndarray:
    """onnxruntime when installed, else ONNX's reference evaluator (slow, exact enough)."""
    try:
        import onnxruntime
    except ImportError:
        import onnx
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(onnx.load(str(path))).run(None, {"images": batch.numpy()})[0]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": batch.numpy()})[0]


def export(run: str, fmt: str, out: Path) -> tuple[str, float]:
    """Write the export, reload it, return its format and the max abs logit difference to the checkpoint's
    model. "auto" writes the format `out`'s suffix names (.onnx; .pt, .pth, .ts: TorchScript), and for any
    other name TorchScript when the model traces and its reload matches, ONNX otherwise.

    The file is written under a temporary name in the target directory, checked, and only then renamed to
    `out`: a failed write or check leaves no file at `out` (and an older one there untouched)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = SUFFIXES.get(out.suffix.lower(), "auto")
    problem = output_file_problem(out, "--out")
    if problem:
        raise UserError(problem)
    model, meta = checkpoint.load_model(Path(run))
    model = model.float().to(memory_format=torch.contiguous_format)
    batch = check_batch(meta)  # checked on another batch size than the traced one: the batch is dynamic
    with torch.inference_mode():
        expected = model(batch).numpy()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create {out.parent} ({e.strerror or e})") from None
    with atomic_path(out) as tmp:
        if fmt == "auto":
            fmt, diff = _first_that_works(model, meta, tmp, out, batch, expected)
        else:
            diff = _write_and_check(fmt, model, meta, tmp, out, batch, expected)
    return fmt, diff


def _first_that_works(model: torch.nn.Module, meta: dict[str, Any], tmp: Path, out: Path, batch: torch.Tensor,
                      expected: np.ndarray) -> tuple[str, float]:
    """TorchScript if the model traces and its reload gives the checkpoint's logits, else ONNX."""
    try:
        return "torchscript", _write_and_check("torchscript", model, meta, tmp, out, batch, expected)
    except WriteFailed:
        raise
    except UserError:  # a model torch.jit cannot trace (or whose trace differs)
        return "onnx", _write_and_check("onnx", model, meta, tmp, out, batch, expected)


def _write_and_check(fmt: str, model: torch.nn.Module, meta: dict[str, Any], tmp: Path, out: Path,
                     batch: torch.Tensor, expected: np.ndarray) -> float:
    """The export traced on a batch of 2 into `tmp`, then its max abs logit difference on `batch`."""
    _write(fmt, model, check_batch(meta, 2), meta, tmp, out)
    return _check(fmt, tmp, out, batch, expected)


def _write(fmt: str, model: torch.nn.Module, example: torch.Tensor, meta: dict[str, Any], tmp: Path,
           out: Path) -> None:
    """The export into `tmp`; a failed write (disk full, permissions) is one line naming `out`."""
    try:
        (export_torchscript if fmt == "torchscript" else export_onnx)(model, example, meta, tmp)
    except OSError as e:
        raise WriteFailed(f"--out {out}: cannot write ({e.strerror or e})") from None
    except RuntimeError as e:  # torch's file writer reports a failed write as a RuntimeError
        first = one_line(e)
        if "writ" in str(e).lower():
            raise WriteFailed(f"--out {out}: cannot write ({first})") from None
        if fmt == "torchscript":
            raise UserError(f"the model does not trace to TorchScript ({first}); export it as ONNX "
                            "(--format onnx)") from None
        raise


def _check(fmt: str, tmp: Path, out: Path, batch: torch.Tensor, expected: np.ndarray) -> float:
    actual = (run_torchscript if fmt == "torchscript" else run_onnx)(tmp, batch)
    if actual.shape != expected.shape:
        raise UserError(f"export check failed: {out} would return logits of shape {actual.shape}, "
                        f"expected {expected.shape}; nothing written")
    diff = float(np.abs(actual - expected).max())
    if not diff <= TOLERANCE:
        raise UserError(f"export check failed: {out} would differ from the checkpoint by {diff:.3g} "
                        f"(> {TOLERANCE}); nothing written")
    return diff
