"""Totals and top-k on hand-computed logits: top-1 / top-5 with several classes, fewer than 5 classes,
ties (a deterministic rule), NaN, loss sums, saved sums, and zero samples (no score, never 0.0)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from train.metrics import Totals, format_metric, predictions, ranks, topk_hits

# 8 classes, distinct logits: the class order by logit is given per row (best first).
LOGITS = torch.tensor([
    [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # order 0 1 2 3 4 5 6 7
    [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],  # order 7 6 5 4 3 2 1 0
    [0.5, 9.0, 0.1, 3.0, 2.0, 7.0, 0.2, 4.0],  # order 1 5 7 3 4 0 6 2
    [5.0, 1.0, 4.0, 2.0, 3.0, 0.0, 6.0, -1.0],  # order 6 0 2 4 3 1 5 7
])


def test_ranks_and_hits_with_eight_classes() -> None:
    labels = torch.tensor([0, 3, 4, 5])
    # row 0: label first; row 1: label 3 is 5th (7 6 5 4 ahead); row 2: label 4 is 5th; row 3: label 5 is 7th
    assert ranks(LOGITS, labels).tolist() == [0, 4, 4, 6]
    top1, top5 = topk_hits(LOGITS, labels)
    assert (int(top1), int(top5)) == (1, 3)
    # 4th place (rank 3) is a top-5 hit, 6th place (rank 5) is not: top-3 and top-5 differ here
    labels = torch.tensor([3, 2, 3, 1])
    assert ranks(LOGITS, labels).tolist() == [3, 5, 3, 5]
    assert [int(x) for x in topk_hits(LOGITS, labels)] == [0, 2]


def test_fewer_than_five_classes_every_sample_is_a_top5_hit() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.3], [2.0, 1.0, 0.0]])
    labels = torch.tensor([2, 0])
    assert ranks(logits, labels).tolist() == [1, 0]
    assert [int(x) for x in topk_hits(logits, labels)] == [1, 2]


def test_ties_go_to_the_lower_class_index() -> None:
    """Equal logits: the lower class index is ahead, as argmax picks the first maximum."""
    logits = torch.tensor([
        [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0 tied with 1: 0 is ahead -> top-1 hit
        [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 1 tied with 0: 0 is ahead -> rank 1
        [3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],  # label 6 tied with 1..5: all ahead -> rank 6, not top-5
        [3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],  # label 4 tied with 1..5: 0 and 1..3 ahead -> rank 4, top-5
        [0.0] * 7,  # all equal, label 5: rank 5
    ])
    labels = torch.tensor([0, 1, 6, 4, 5])
    assert ranks(logits, labels).tolist() == [0, 1, 6, 4, 5]
    assert [int(x) for x in topk_hits(logits, labels)] == [1, 3]
    assert predictions(logits).tolist() == [0, 0, 0, 0, 0]  # top-1 hits == argmax agrees with the label
    # the rule is the position of the label in a stable sort by descending logit, on any ties
    generator = torch.Generator().manual_seed(0)
    many = torch.randint(0, 3, (200, 9), generator=generator).float()  # 3 values over 9 classes: ties
    targets = torch.randint(0, 9, (200,), generator=generator)
    order = torch.sort(-many, dim=1, stable=True).indices
    assert ranks(many, targets).tolist() == (order == targets[:, None]).int().argmax(dim=1).tolist()


def test_nan_logits_rank_last() -> None:
    nan = math.nan
    logits = torch.tensor([[nan, 1.0, 2.0, 0.0, 0.0, 0.0], [1.0, nan, 0.5, 0.2, 0.1, 0.0]])
    labels = torch.tensor([0, 0])
    assert ranks(logits, labels).tolist() == [5, 0]  # a NaN label is beaten by every number
    assert predictions(logits).tolist() == [2, 0]


def test_totals_sums_loss_and_hits_exactly() -> None:
    labels = torch.tensor([0, 3, 4, 5])
    totals = Totals()
    totals.add(LOGITS[:2], labels[:2])
    totals.add(LOGITS[2:], labels[2:])
    loss = F.cross_entropy(LOGITS.double(), labels, reduction="sum").item()
    assert totals.sums.tolist() == pytest.approx([loss, 1.0, 3.0, 4.0], rel=1e-6)
    result = totals.as_dict()
    assert result["loss"] == pytest.approx(loss / 4, rel=1e-6)
    assert (result["top1"], result["top5"], result["num_samples"]) == (0.25, 0.75, 4)
    # a given loss sum (the train loop passes its own, with label smoothing) is used as it is
    other = Totals()
    other.add(LOGITS, labels, loss_sum=torch.tensor(10.0))
    assert other.as_dict()["loss"] == 2.5


def test_state_dict_resumes_partial_totals() -> None:
    labels = torch.tensor([0, 3, 4, 5])
    whole, first, second = Totals(), Totals(), Totals()
    whole.add(LOGITS, labels)
    first.add(LOGITS[:3], labels[:3])
    first.bad += 2
    saved = json.loads(json.dumps(first.state_dict()))  # what a checkpoint's trainer.json carries
    assert set(saved) == {"partial", "partial_bad"} and saved["partial_bad"] == 2
    assert saved["partial"] == first.sums.tolist()
    second.load_state_dict(saved)  # what a resumed epoch starts from
    second.add(LOGITS[3:], labels[3:])
    assert second.sums.tolist() == pytest.approx(whole.sums.tolist(), rel=1e-12)
    assert second.as_dict() == pytest.approx(whole.as_dict(), rel=1e-12)
    assert int(second.bad) == 2
    assert Totals().state_dict() == {"partial": [0.0] * 4, "partial_bad": 0}  # an epoch's start


def test_summed_reduces_a_copy() -> None:
    totals = Totals()
    totals.add(LOGITS, torch.tensor([0, 3, 4, 5]))
    totals.bad += 1
    doubled = totals.summed(lambda t: t.mul_(2))  # an in-place reduction, as all_reduce is
    assert doubled.sums.tolist() == [2 * v for v in totals.sums.tolist()] and int(doubled.bad) == 2
    assert int(totals.bad) == 1  # the original is left as it is


def test_zero_samples_is_no_score() -> None:
    result = Totals().as_dict()
    assert result == {"loss": None, "top1": None, "top5": None, "num_samples": 0}
    assert json.loads(json.dumps(result)) == result  # JSON null, not 0.0 or NaN
    assert format_metric(result["top1"]) == "n/a" and format_metric(0.5) == "0.5000"
    empty = Totals()
    empty.add(torch.zeros(0, 7), torch.zeros(0, dtype=torch.long))
    assert empty.as_dict()["num_samples"] == 0 and empty.as_dict()["top1"] is None
