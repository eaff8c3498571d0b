"""Loss and top-k counts summed per process, then reduced once: exact whatever the number of processes.

Ranking rule (deterministic, whatever order torch.topk returns equal values in): a sample's rank is the
number of classes that beat its true class, where a class beats it with a larger logit, or with an equal
logit and a lower class index (the tie-break of argmax, so top-1 agrees with argmax predictions). A NaN
logit ranks below every number. The sample is a top-k hit when its rank is below k; k is capped by the
number of classes, so with fewer than 5 classes every sample is a top-5 hit.

Over zero samples there is no score: `Totals.as_dict` gives None (JSON null) for loss, top-1 and top-5,
never 0.0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

TOP_K = 5
TOTALS_KEYS = ("partial", "partial_bad")  # Totals.state_dict's (trainer.json's names)


class Totals:
    """Running sums of loss, top-1 and top-5 hits and samples, and the count of corrupt samples dropped,
    kept on the device (no sync per batch)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
        self.bad = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor | None = None) -> None:
        """Add a batch: `loss_sum` is the summed loss of its samples (cross-entropy of `logits` if None)."""
        if loss_sum is None:
            loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        top1, top5 = topk_hits(logits, labels)
        self.sums += torch.stack([loss_sum.detach().double(), top1.double(), top5.double(),
                                  torch.tensor(float(labels.numel()), dtype=torch.float64, device=self.sums.device)])

    def summed(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> Totals:
        """A new Totals of these sums `reduce`d (e.g. summed over processes); this one is left as it is."""
        out = Totals(self.sums.device)
        out.sums, out.bad = reduce(self.sums.clone()), reduce(self.bad.clone())
        return out

    def state_dict(self) -> dict[str, Any]:
        """The sums so far, by trainer.json's names (what a mid-epoch checkpoint carries of its epoch)."""
        return {"partial": self.sums.tolist(), "partial_bad": int(self.bad.item())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start from the sums a state_dict holds."""
        self.sums = torch.tensor(state["partial"], dtype=torch.float64, device=self.sums.device)
        self.bad = torch.tensor(state["partial_bad"], dtype=torch.int64, device=self.sums.device)

    def as_dict(self) -> dict[str, Any]:
        """Means over the samples; loss, top1 and top5 are None when there were no samples."""
        loss, top1, top5, count = self.sums.tolist()
        if count == 0:
            return {"loss": None, "top1": None, "top5": None, "num_samples": 0}
        return {"loss": loss / count, "top1": top1 / count, "top5": top5 / count, "num_samples": int(count)}


def ranks(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample, how many classes beat the true class (see the module docstring for ties and NaN)."""
    scores = torch.where(torch.isnan(logits), torch.full_like(logits, -torch.inf), logits)
    target = scores.gather(1, labels[:, None])
    index = torch.arange(scores.shape[1], device=scores.device)
    beats = (scores > target) | ((scores == target) & (index[None, :] < labels[:, None]))
    return beats.sum(dim=1)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Number of samples whose label is the top-1 / among the top-5 (top-k capped by the class count)."""
    rank = ranks(logits, labels)
    return (rank < 1).sum(), (rank < min(TOP_K, logits.shape[1])).sum()


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """The top-1 class of each sample under the same rule (NaN ranks last; ties go to the lower index)."""
    scores = torch.where(torch.isnan(logits), torch.full_like(logits, -torch.inf), logits)
    return scores.argmax(dim=1)


def format_metric(value: float | None, spec: str = ".4f") -> str:
    """A metric for a printed line: 'n/a' where there were no samples."""
    return "n/a" if value is None else format(value, spec)
