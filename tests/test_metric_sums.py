"""The epoch's metric sums: batch-weighted, grouped by the names a step logged, exact across a resume."""

from __future__ import annotations

import torch

from robustbench_kd.training.metric_sums import MetricSums


def test_sums_are_batch_weighted_and_merge_groups_by_name():
    sums = MetricSums()
    sums.add(("loss", "a"), torch.tensor([1.0, 2.0]), 4)
    sums.add(("loss", "a"), torch.tensor([3.0, 5.0]), 2)
    sums.add(("loss", "b"), torch.tensor([0.5, 7.0]), 2)  # a term logged only at some steps
    totals = {k: float(v) for k, v in sums.by_name().items()}
    assert totals == {"loss": 4 * 1.0 + 2 * 3.0 + 2 * 0.5, "a": 4 * 2.0 + 2 * 5.0, "b": 2 * 7.0}


def test_resume_from_a_position_continues_bitwise():
    steps = [(torch.rand(3), b) for b in (7, 5, 3, 9)]
    whole = MetricSums()
    for values, b in steps:
        whole.add(("loss", "x", "y"), values, b)
    first = MetricSums()
    for values, b in steps[:2]:
        first.add(("loss", "x", "y"), values, b)
    resumed = MetricSums.from_position(first.position_entries())
    for values, b in steps[2:]:
        resumed.add(("loss", "x", "y"), values, b)
    assert all(torch.equal(whole.by_name()[k], resumed.by_name()[k]) for k in ("loss", "x", "y"))


def test_a_step_checkpoint_with_only_totals_by_name_still_resumes():
    legacy = {"sums": {"loss": torch.tensor(6.0), "a": torch.tensor(2.0)}}
    sums = MetricSums.from_position(legacy)
    sums.add(("loss", "a"), torch.tensor([1.0, 1.0]), 2)
    assert {k: float(v) for k, v in sums.by_name().items()} == {"loss": 8.0, "a": 4.0}
    assert MetricSums.from_position({"sums": {}}).by_name() == {}
