"""2-D views of penultimate features for the evaluation report: PCA here, t-SNE in a child process.

Why a child process: scikit-learn's Barnes-Hut t-SNE is native OpenMP code, and input it cannot handle
(NaN rows, or features with no variance, which PCA turns into NaN) ends in a segmentation fault there, not in
an exception: inside `fit` that took the whole run down after training. In a child, a crash is one warning
and the rest of the report is written; the child also starts with no thread pools inherited from torch or
from DataLoader forks. Input is cleaned first (non-finite rows dropped, constant features refused), so the
crash is not reached in the first place.

`python -m train.embedding IN.npy OUT.npy` is the child's entry point (not a user command).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TSNE_MAX_POINTS = 2000  # t-SNE's cost grows faster than the points: a seeded subsample beyond this
PCA_DIMS_BEFORE_TSNE = 50
TSNE_MIN_POINTS = 5
TSNE_TIMEOUT_S = 900


class EmbeddingError(Exception):
    """An embedding that cannot be computed; the message says why in a few words."""


def finite_rows(features: np.ndarray) -> np.ndarray:
    """Indices of the rows with only finite values."""
    return np.flatnonzero(np.isfinite(features).all(axis=1)) if len(features) else np.arange(0)


def pca(features: np.ndarray, dims: int) -> np.ndarray:
    """Seeded PCA to at most `dims` dimensions; refuses features with no variance (PCA would give NaN)."""
    if not np.ptp(features, axis=0).any():
        raise EmbeddingError("the features are the same for every image")
    from sklearn.decomposition import PCA

    return PCA(n_components=min(dims, *features.shape), random_state=0).fit_transform(features)


def tsne(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE (seeded) of at most TSNE_MAX_POINTS rows (a seeded subsample), after PCA to 50 dims, computed
    in a child process; returns (points, indices of the rows used)."""
    chosen = np.arange(len(features))
    if len(features) < TSNE_MIN_POINTS:
        raise EmbeddingError(f"too few images ({len(features)})")
    if len(features) > TSNE_MAX_POINTS:
        chosen = np.sort(np.random.default_rng(0).choice(len(features), TSNE_MAX_POINTS, replace=False))
    reduced = pca(features[chosen], PCA_DIMS_BEFORE_TSNE).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="cubstream-tsne-") as tmp:
        source, target = Path(tmp) / "in.npy", Path(tmp) / "out.npy"
        np.save(source, reduced)
        env = {**os.environ, "OMP_NUM_THREADS": str(_spare_cores())}
        try:
            done = subprocess.run([sys.executable, "-m", "train.embedding", str(source), str(target)],
                                  capture_output=True, text=True, env=env, timeout=TSNE_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise EmbeddingError(f"t-SNE took longer than {TSNE_TIMEOUT_S} s") from e
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise EmbeddingError(f"t-SNE's process ended with status {done.returncode} ({last})")
        return np.load(target), chosen


def _spare_cores() -> int:
    """All cores but one: OpenMP threads fighting for busy cores slow t-SNE down many times."""
    return max(1, len(os.sched_getaffinity(0)) - 1) if hasattr(os, "sched_getaffinity") else 1


def _child(source: str, target: str) -> None:
    from sklearn.manifold import TSNE

    points = np.load(source)
    perplexity = min(30.0, (len(points) - 1) / 3)  # it must stay below the number of points
    np.save(target, TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(points))


if __name__ == "__main__":
    _child(*sys.argv[1:3])
