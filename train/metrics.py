"""Loss and top-k counts summed per process, then reduced once: exact whatever the number of processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Totals:
    """Running sums of loss, top-1 and top-5 hits and samples, kept on the device (no sync per batch)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor | None = None) -> None:
        if loss_sum is None:
            loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        top1, top5 = topk_hits(logits, labels)
        self.sums += torch.stack([loss_sum.detach().double(), top1.double(), top5.double(),
                                  torch.tensor(float(labels.numel()), dtype=torch.float64, device=self.sums.device)])

    def add_sums(self, values: list[float]) -> None:
        self.sums += torch.tensor(values, dtype=torch.float64, device=self.sums.device)

    def as_dict(self) -> dict[str, float]:
        loss, top1, top5, count = self.sums.tolist()
        n = max(count, 1.0)
        return {"loss": loss / n, "top1": top1 / n, "top5": top5 / n, "num_samples": int(count)}


def topk_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Number of samples whose label is the top-1 / among the top-5 (top-k capped by the class count)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top.eq(labels[:, None])
    return hits[:, 0].sum(), hits.any(dim=1).sum()
