"""Per-epoch diagnostics: every formula against a hand computation on small tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from robustbench_kd.analysis.diagnostics import metrics as M
from robustbench_kd.analysis.diagnostics import trajectories


def test_entropy_by_hand():
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    # 0 log 0 = 0; third row: -(2 * 0.25 ln 0.25 + 0.5 ln 0.5) = 1.5 ln 2
    assert M.entropy(probs).tolist() == pytest.approx([math.log(2), 0.0, 1.5 * math.log(2)])


def test_reliability_bins_and_ece_by_hand():
    probs = torch.tensor(
        [
            [0.40, 0.35, 0.25],  # conf .4 -> bin (0, .5], pred 0, y 1: wrong
            [0.90, 0.05, 0.05],  # conf .9 -> bin (.5, 1], right
            [0.10, 0.80, 0.10],  # conf .8, pred 1, y 0: wrong
            [0.20, 0.70, 0.10],
        ]
    )  # conf .7, right
    y = torch.tensor([1, 0, 0, 1])
    table = M.reliability_bins(probs, y, 2)
    assert table["lower"] == [0.0, 0.5] and table["upper"] == [0.5, 1.0]
    assert table["count"] == [1.0, 3.0]
    assert table["confidence"] == pytest.approx([0.4, 0.8])
    assert table["accuracy"] == pytest.approx([0.0, 2 / 3])
    # ECE = 1/4 |0 - .4| + 3/4 |2/3 - .8| = 0.1 + 0.1
    assert M.expected_calibration_error(table) == pytest.approx(0.2)


def test_reliability_bin_edges_are_right_closed_and_empty_bins_are_nan():
    # conf exactly 0.5 -> bin 1 of 4 ((.25, .5]); 1.0 -> last bin
    probs = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    table = M.reliability_bins(probs, torch.tensor([0, 0]), 4)
    assert table["count"] == [0.0, 1.0, 0.0, 1.0]
    assert math.isnan(table["accuracy"][0]) and math.isnan(table["confidence"][2])
    assert M.expected_calibration_error(table) == pytest.approx(0.5 * abs(1 - 0.5) + 0.5 * abs(1 - 1.0))


def test_agreement_by_hand():
    a = torch.eye(3)[[0, 1, 2, 1]]
    b = torch.eye(3)[[0, 2, 2, 0]]
    assert M.agreement(a, b) == 0.5


def test_per_class_accuracy_and_worst_class_by_hand():
    acc = M.per_class_accuracy(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1]), 4)
    assert acc[:2].tolist() == pytest.approx([1.0, 1 / 3]) and torch.isnan(acc[2:]).all()
    assert M.worst_class(acc) == (1, pytest.approx(1 / 3))
    assert M.worst_class(torch.tensor([0.5, 0.2, 0.2])) == (1, pytest.approx(0.2))  # lowest index on a tie


def test_correct_class_probability_and_cross_entropy_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = (1/4, 3/4)
    y = torch.tensor([1])
    assert M.correct_class_prob(logits.softmax(1), y).tolist() == pytest.approx([0.75])
    assert M.cross_entropy_from_logits(logits, y).tolist() == pytest.approx([math.log(4 / 3)])


def test_difficulty_is_mean_ce_over_epochs():
    assert M.difficulty(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])).tolist() == [2.0, 1.0]


def test_trajectory_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0], [1.0, 1.0], [4.0, 3.0]])
    # orthogonal, parallel, zero row (0 by convention), (12 + 12) / (5 * 5)
    assert M.trajectory_cosine(a, b).tolist() == pytest.approx([0.0, 1.0, 0.0, 24 / 25])


def test_easy_hard_split_orders_by_difficulty():
    easy, hard = M.easy_hard_split(torch.tensor([3.0, 1.0, 2.0]))
    assert easy.tolist() == [1, 2] and hard.tolist() == [0]


def test_trajectory_file_appends_columns_and_replaces_a_repeated_epoch(tmp_path):
    path = tmp_path / "diagnostics" / "trajectories.npz"
    index, y = np.array([4, 7]), np.array([0, 1])
    for epoch, values in ((1, [0.1, 0.2]), (2, [0.3, 0.4]), (2, [0.5, 0.6])):  # epoch 2 again: a resume
        arrays = trajectories.append(
            path, epoch=epoch, split="val", index=index, y=y, columns={"student_clean_p": np.array(values)}
        )
        trajectories.write(path, arrays)
    saved = trajectories.load(path)
    assert saved["epochs"].tolist() == [1, 2] and str(saved["split"]) == "val"
    assert saved["student_clean_p"] == pytest.approx(np.array([[0.1, 0.5], [0.2, 0.6]]))
    # another subset: the file starts afresh rather than mixing samples
    arrays = trajectories.append(
        path, epoch=3, split="val", index=np.array([1, 2]), y=y, columns={"student_clean_p": np.array([0.9, 0.8])}
    )
    assert arrays["epochs"].tolist() == [3] and arrays["student_clean_p"].shape == (2, 1)
