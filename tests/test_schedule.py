"""The paper's schedule rule: LR drops at the last 60k and 20k iterations, whatever the length."""

import pytest

from bench import schedule
from bench.spec import SolverSpec, SpecError


def resolved(name, batch=16, **kw):
    return schedule.resolve(SolverSpec(schedule=name, batch=batch, **kw))


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 9])
def test_long_schedules_drop_lr_at_last_60k_and_20k(n):
    s = resolved(f"{n}x")
    assert s.max_iter == n * 90_000
    assert s.steps == (n * 90_000 - 60_000, n * 90_000 - 20_000)
    assert s.lr == 0.02


def test_1x_is_detectrons_standard_schedule():
    s = resolved("1x")
    assert (s.max_iter, s.steps) == (90_000, (60_000, 80_000))


def test_detectron2_9x_at_batch_64_matches_its_published_config():
    # configs/Misc/scratch_mask_rcnn_R_50_FPN_9x_gn.yaml: 202500 iters, steps (187500, 197500), LR 0.08
    s = resolved("9x", batch=64)
    assert (s.max_iter, s.steps, s.lr) == (202_500, (187_500, 197_500), pytest.approx(0.08))


@pytest.mark.parametrize("batch,iters,steps,lr", [(8, 540_000, (420_000, 500_000), 0.01),
                                                  (32, 135_000, (105_000, 125_000), 0.04)])
def test_batch_scales_lr_linearly_and_iterations_inversely(batch, iters, steps, lr):
    s = resolved("3x", batch=batch)
    assert (s.max_iter, s.steps, s.lr) == (iters, steps, pytest.approx(lr))


def test_mini_scale_keeps_the_rule():
    # The mini study: 1/2000 of the paper's iterations, batch 8.
    s = resolved("3x", batch=8, unit_iters=45, drops_from_end=(30, 10))
    assert (s.max_iter, s.steps) == (270, (210, 250))


def test_explicit_iterations_follow_the_rule():
    s = resolved("100000iter")
    assert s.steps == (40_000, 80_000)


@pytest.mark.parametrize("bad", ["3X", "three", "x", ""])
def test_unknown_schedule_names_are_errors(bad):
    with pytest.raises(SpecError, match="allowed"):
        resolved(bad)


def test_batch_that_gives_fractional_iterations_is_an_error():
    with pytest.raises(SpecError, match="whole number"):
        resolved("1x", batch=7)


def test_warmup_is_linear_then_steps_multiply_by_gamma():
    s = resolved("2x")
    assert schedule.lr_factor(s, 0) == pytest.approx(0.001)
    assert schedule.lr_factor(s, 500) == pytest.approx(0.001 * 0.5 + 0.5)
    assert schedule.lr_factor(s, 1000) == 1.0
    assert schedule.lr_factor(s, 120_000) == pytest.approx(0.1)
    assert schedule.lr_factor(s, 160_000) == pytest.approx(0.01)
