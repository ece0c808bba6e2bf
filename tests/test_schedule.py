import math

import pytest

from magmax.training.schedule import peak_lr, warmup_cosine_lr


def test_reference_schedule_points():
    lr, warm, total = 1e-5, 500, 2000
    assert warmup_cosine_lr(0, lr, warm, total) == pytest.approx(lr / 500)
    assert warmup_cosine_lr(499, lr, warm, total) == pytest.approx(lr)
    assert warmup_cosine_lr(500, lr, warm, total) == pytest.approx(lr)  # cosine starts at its peak
    last = total - 1
    expected = 0.5 * (1 + math.cos(math.pi * (last - warm) / (total - warm))) * lr
    assert warmup_cosine_lr(last, lr, warm, total) == pytest.approx(expected)
    assert warmup_cosine_lr(last, lr, warm, total) < lr * 1e-5


def test_absolute_warmup_quirk_caps_peak_lr():
    # CIFAR-100/10: 5,000 images per task, batch 128, 10 epochs -> 400 steps, never leaves warm-up.
    steps = 10 * math.ceil(5000 / 128)
    assert steps == 400
    assert peak_lr(1e-5, 500, steps) == pytest.approx(8e-6)
    assert max(warmup_cosine_lr(s, 1e-5, 500, steps) for s in range(steps)) == pytest.approx(8e-6)
    assert peak_lr(1e-5, 500, 2000) == 1e-5
    assert peak_lr(1e-5, 0, 10) == 1e-5
