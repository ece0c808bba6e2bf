import numpy as np
import pytest

from magmax.metrics import (
    average_incremental_accuracy,
    backward_transfer,
    final_accuracy,
    forgetting,
    seen_accuracy,
    summarize,
)

# Hand-computed: after task 2 the model is at 60/50/85 on tasks 1/2/3 (test sizes 100/100/200).
ACC = np.array([[90.0, 10.0, 5.0], [95.0, 80.0, 6.0], [60.0, 50.0, 85.0]])
SIZES = np.array([100, 100, 200])


def test_final_accuracy_is_sample_weighted_last_row():
    assert final_accuracy(ACC, SIZES) == pytest.approx((60 * 100 + 50 * 100 + 85 * 200) / 400)  # 70.0


def test_average_incremental_accuracy():
    assert seen_accuracy(ACC, SIZES, 1) == pytest.approx(87.5)
    assert average_incremental_accuracy(ACC, SIZES) == pytest.approx((90 + 87.5 + 70) / 3)


def test_forgetting_uses_best_earlier_accuracy():
    # task 1: best 95 (after task 2) -> 60 = 35; task 2: 80 -> 50 = 30
    assert forgetting(ACC) == pytest.approx(32.5)


def test_backward_transfer_against_just_learned_accuracy():
    # (60 - 90 + 50 - 80) / 2
    assert backward_transfer(ACC) == pytest.approx(-30.0)


def test_single_task_has_no_forgetting():
    one = np.array([[70.0]])
    assert forgetting(one) is None and backward_transfer(one) is None
    assert summarize(one, [10])["final_accuracy"] == 70.0


def test_forgetting_is_negative_when_accuracy_only_grows():
    acc = np.array([[50.0, 0.0], [60.0, 70.0]])
    assert forgetting(acc) == pytest.approx(-10.0)
    assert backward_transfer(acc) == pytest.approx(10.0)
