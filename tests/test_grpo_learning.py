"""GRPO learns: on a stand-in backend with a known optimum it reaches the oracle, at every budget.

The table backend (tests/table_backend.py) has four question types of rising difficulty; the
cheapest configuration that answers a type correctly costs more than the low end of the budget
range for two of them and more than its middle for one, so the oracle's choices (and its
latency) move with the budget. One policy trained over the range must match the oracle at the
low, middle and high budget: spend a loose budget on the hard inputs and save under a tight one.
A violation costs more than any answer is worth here (``violation_penalty=1``), so the optimum
never buys accuracy with a violation.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest

import agents
import envs  # noqa: F401  (registers the env ids)
from agents import evaluate_agent
from table_backend import TableBackend, TableLatency

pytestmark = pytest.mark.learning  # reruns under a second CPU capability in CI (.ci/run)

RANGE = "[20ms,50ms]"
BUDGETS_MS = (20.0, 35.0, 50.0)
UPDATES = 400  # fixed: the number the test promises, on a fixed seed


@pytest.fixture(scope="module")
def env():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return gym.make("MultiKnob-v0", backend=TableBackend(), budget=RANGE, estimator=TableLatency(),
                        violation_penalty=1.0)


@pytest.fixture(scope="module")
def results(env):
    grpo = agents.make_agent("grpo", env, total_updates=UPDATES, seed=0)
    grpo.fit(env)
    grpo.freeze()
    oracle = agents.make_agent("oracle", env)
    ids = list(range(96))
    return {b: (evaluate_agent(env, grpo, ids, b, "test"), evaluate_agent(env, oracle, ids, b, "test"))
            for b in BUDGETS_MS}


def test_the_stand_in_optimum_depends_on_the_budget(results):
    oracle_p50 = [results[b][1]["latency_p50_ms"] for b in BUDGETS_MS]
    oracle_score = [results[b][1]["score"] for b in BUDGETS_MS]
    assert oracle_p50[0] < oracle_p50[1] < oracle_p50[2]
    assert oracle_score[0] < oracle_score[1] < oracle_score[2]
    assert all(results[b][1]["violation_rate"] == 0 for b in BUDGETS_MS)


@pytest.mark.parametrize("budget_ms", BUDGETS_MS)
def test_grpo_trained_over_a_range_reaches_the_oracle_at_each_budget(results, budget_ms):
    grpo, oracle = results[budget_ms]
    assert grpo["score"] >= 0.95 * oracle["score"]
    assert grpo["reward"] >= 0.95 * oracle["reward"]
    assert grpo["violation_rate"] <= 0.05


def test_grpo_latency_moves_with_the_budget(results):
    p50 = [results[b][0]["latency_p50_ms"] for b in BUDGETS_MS]
    assert p50[0] < p50[2] and np.all(np.diff(p50) >= 0)
