"""Budget parsing and the shared reward: the one definition each that every env uses."""

import math

import numpy as np
import pytest

from envs.budget import BOUNDS_TEXT, MIN_BUDGET_MS, Budget, check_budget_ms
from envs.reward import MAX_OVERSHOOT, RewardConfig, compute_reward, compute_rewards


@pytest.mark.parametrize("text, ms", [("120ms", 120.0), ("120 ms", 120.0), ("0.12s", 120.0), (120, 120.0),
                                      ("120", 120.0), (" 80.5MS ", 80.5), ("120000us", 120.0), (0.5, 0.5)])
def test_fixed_budget_forms(text, ms):
    budget = Budget.parse(text)
    assert not budget.is_range
    assert budget.low_ms == pytest.approx(ms)
    assert budget.fixed_ms == pytest.approx(ms)


@pytest.mark.parametrize("value", ["[60ms,200ms]", "[60ms, 0.2s]", (60, 200), ["60ms", "200ms"]])
def test_range_budget_is_sampled_uniformly_from_rng(value):
    budget = Budget.parse(value)
    assert budget.is_range and (budget.low_ms, budget.high_ms) == (60.0, 200.0)
    draws = [budget.sample(np.random.default_rng(seed)) for seed in range(200)]
    assert min(draws) >= 60 and max(draws) <= 200
    assert np.std(draws) > 20  # really spread over the range, not a constant
    assert budget.sample(np.random.default_rng(7)) == budget.sample(np.random.default_rng(7))


@pytest.mark.parametrize("bad", [0, "0ms", -5, "-5ms", float("nan"), float("inf"), "inf", "fast", "", "12 parsecs",
                                 "[200ms,60ms]", "[1ms]", True, None, {"ms": 3}])
def test_bad_budgets_name_the_input_and_the_accepted_forms(bad):
    with pytest.raises(ValueError) as err:
        Budget.parse(bad)
    message = str(err.value)
    assert repr(bad) in message
    assert "accepted" in message and "120ms" in message


def test_range_where_single_budget_needed():
    with pytest.raises(ValueError, match="single budget"):
        Budget.parse("[60ms,200ms]").fixed_ms


def test_reward_formula():
    cfg = RewardConfig(overshoot_penalty=2.0, violation_penalty=0.5)
    assert compute_reward(1.0, 100.0, 120.0, cfg) == (1.0, False)
    reward, violated = compute_reward(1.0, 132.0, 120.0, cfg)  # 10% over
    assert violated and reward == pytest.approx(1.0 - 2.0 * 0.1 - 0.5)
    reward, violated = compute_reward(0.0, 120.0, 120.0, cfg)  # exactly on budget is not a violation
    assert reward == 0.0 and not violated


def test_vectorised_reward_matches_scalar():
    rng = np.random.default_rng(0)
    scores, lat, bud = rng.random(50), rng.uniform(20, 200, 50), rng.uniform(50, 150, 50)
    cfg = RewardConfig(1.5, 0.25)
    rewards, violated = compute_rewards(scores, lat, bud, cfg)
    for i in range(50):
        r, v = compute_reward(scores[i], lat[i], bud[i], cfg)
        assert rewards[i] == pytest.approx(r) and violated[i] == v


@pytest.mark.parametrize("kwargs", [{"overshoot_penalty": -1}, {"violation_penalty": math.nan}])
def test_bad_reward_coefficients(kwargs):
    with pytest.raises(ValueError, match="accepted"):
        RewardConfig(**kwargs)


@pytest.mark.parametrize("bad", ["1e-310ms", "1e-300ms", 1e-310, "0.001ms", "2h", "3600001ms", "1e400ms", "[1e-300ms,5ms]"])
def test_budgets_outside_the_sane_range_are_one_clear_error(bad):
    with pytest.raises(ValueError) as err:
        Budget.parse(bad)
    message = str(err.value)
    assert repr(bad) in message and "accepted" in message
    if bad != "2h":
        assert BOUNDS_TEXT in message or "finite" in message


@pytest.mark.parametrize("value", [np.float64(65.0), np.float32(65.0), np.int64(65), np.array(65.0), np.array(65)])
def test_numpy_scalars_and_0d_arrays_are_numbers(value):
    assert Budget.parse(value) == Budget(65.0, 65.0)
    assert check_budget_ms(value) == 65.0


def test_numpy_pair_is_a_range():
    assert Budget.parse(np.array([60.0, 200.0])) == Budget(60.0, 200.0)


def test_training_range_jitters_a_fixed_budget_and_widens_a_range():
    assert Budget.parse("100ms").training_range(0.2) == Budget(80.0, 120.0)
    assert Budget.parse("100ms").training_range(0.0) == Budget(100.0, 100.0)
    assert Budget.parse("[60ms,200ms]").training_range(0.2) == Budget(48.0, 240.0)
    assert Budget.parse("[60ms,200ms]").training_range(0.0) == Budget(60.0, 200.0)
    with pytest.raises(ValueError, match="budget_jitter=1.5"):
        Budget.parse("100ms").training_range(1.5)
    rng = np.random.default_rng(0)
    draws = [Budget.parse("100ms").training_range(0.2).sample(rng) for _ in range(100)]
    assert 80 <= min(draws) and max(draws) <= 120
    assert Budget.parse("[60ms,200ms]").evaluation_budgets() == [60.0, 130.0, 200.0]


@pytest.mark.parametrize("score, latency, budget, match", [
    (math.nan, 10.0, 10.0, "score=nan"), (1.5, 10.0, 10.0, "score=1.5"), (0.5, math.inf, 10.0, "latency_ms=inf"),
    (0.5, -1.0, 10.0, "latency_ms=-1.0"), (0.5, 10.0, 0.0, "budget_ms=0.0"), (0.5, 10.0, 1e-310, "budget_ms=1e-310")])
def test_reward_inputs_are_checked(score, latency, budget, match):
    with pytest.raises(ValueError, match=match):
        compute_reward(score, latency, budget)
    with pytest.raises(ValueError, match=match):
        compute_rewards([0.5, score], [1.0, latency], [10.0, budget])


def test_reward_is_finite_and_bounded_by_the_overshoot_clip():
    cfg = RewardConfig(overshoot_penalty=2.0, violation_penalty=0.5)
    reward, violated = compute_reward(1.0, 1e12, MIN_BUDGET_MS, cfg)
    assert violated and reward == pytest.approx(1.0 - 2.0 * MAX_OVERSHOOT - 0.5)
    low, high = cfg.reward_range()
    assert low <= reward <= high and math.isfinite(reward)
    with pytest.raises(ValueError, match=r"overshoot_penalty=1e\+300"):
        RewardConfig(overshoot_penalty=1e300)
