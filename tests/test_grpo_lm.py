"""``grpo_lm``: the TRL-trained LM controller learns, checkpoints as data, and runs through the CLI.

The learning tests use the table stand-in backend (tests/table_backend.py), trained at 35 ms over
the jittered range 28-42 ms. A violation costs more than any answer is worth
(``violation_penalty=1``). They assert properties with measured margins, not one seed's trajectory:
the reward reaches a share of the oracle's, and where the best choice differs between inputs (30 ms)
the controller earns what no single configuration can (issue #31: asserting distinct choices at 35 ms
passed with the plain kernels and failed with AVX2 ones).
"""

from __future__ import annotations

import itertools
import json
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

import agents
import envs  # noqa: F401  (registers the env ids)
from agents import EpisodeContext, evaluate_agent
from agents.grpo_lm import ControllerVocab, GRPOLMConfig
from envs.protocols import group_env
from table_backend import TableBackend, TableLatency
from test_train_cli import quick, run_cli, workdir  # noqa: F401  (workdir: the CLI runs' fixture)


BUDGET = "35ms"
UPDATES = 60  # fixed: the number the test promises, on a fixed seed


def table_env(budget: str = BUDGET):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return gym.make("MultiKnob-v0", backend=TableBackend(), budget=budget, estimator=TableLatency(),
                        violation_penalty=1.0)


@pytest.fixture(scope="module")
def env():
    return table_env()


@pytest.fixture(scope="module")
def trained(env):
    agent = agents.make_agent("grpo_lm", env, total_updates=UPDATES, seed=0)
    agent.fit(env)
    return agent.freeze()


@pytest.mark.learning  # reruns under a second CPU capability in CI (.ci/run)
def test_grpo_lm_reaches_85_percent_of_the_oracle(env, trained):
    ids = list(range(96))
    mine = evaluate_agent(env, trained, ids, 35.0, "test")
    oracle = evaluate_agent(env, agents.make_agent("oracle", env), ids, 35.0, "test")
    assert mine["reward"] >= 0.85 * oracle["reward"]
    assert mine["score"] >= 0.85 * oracle["score"]
    assert mine["violation_rate"] <= 0.05


#: A budget inside the trained range where per-input choice pays: the configuration that answers the
#: hard type fits the budget on inputs that generate one token and overshoots it on the "hardest"
#: type (two tokens), so no single configuration reaches the oracle's reward there.
CONDITIONING_BUDGET_MS = 30.0


def best_static_reward(env, ids, budget_ms: float) -> float:
    """The mean reward of the best single configuration on ``ids`` (chosen on those very inputs)."""
    genv = group_env(env)
    grid = [list(a) for a in itertools.product(*(range(int(n)) for n in env.action_space.nvec))]
    per_sample = np.array([genv.evaluate_group(s, budget_ms, grid, "test")[0] for s in ids])
    return float(per_sample.mean(axis=0).max())


@pytest.mark.learning  # reruns under a second CPU capability in CI (.ci/run)
def test_the_controller_conditions_on_the_input(env, trained):
    """Guarantees: where the best choice differs between inputs (``CONDITIONING_BUDGET_MS``), the
    controller chooses per input and earns what no single configuration can: its reward closes at
    least half of the gap between the best static configuration (chosen on the test inputs
    themselves, an upper bound on any static baseline) and the oracle.

    At 35 ms one configuration is optimal for every type (the stand-in's reward has no latency term
    within budget), so choosing one configuration there is right, not a failure; asserting distinct
    choices at 35 ms held on some CPUs' kernels and not on others (issue #31). Measured at 30 ms with
    seeds 0 and 1 under ``ATEN_CPU_CAPABILITY=avx2`` and ``default``: the controller reached the
    oracle (0.771) against the best static 0.704 in every run.
    """
    ids = list(range(96))
    budget = CONDITIONING_BUDGET_MS
    oracle = evaluate_agent(env, agents.make_agent("oracle", env), ids, budget, "test")["reward"]
    static = best_static_reward(env, ids, budget)
    assert oracle - static >= 0.05, "the stand-in no longer rewards per-input choice at this budget"
    mine = evaluate_agent(env, trained, ids, budget, "test")
    assert mine["reward"] >= static + 0.5 * (oracle - static)
    assert mine["violation_rate"] <= 0.05
    genv = group_env(env)
    choices = {tuple(trained.act(genv.stage_observation(s, budget, "test", 0), EpisodeContext(genv, s, budget, "test")))
               for s in ids}
    assert len(choices) >= 2


def test_prompt_and_completion_words():
    vocab = ControllerVocab(obs_dim=3, action_values=3)
    prompt = vocab.prompt(np.array([0.8349, 0.0, -12.0]), 35.4)
    assert prompt == "budget 3 5 ms obs 0:0.8 2:-10.0 act"
    tok = vocab.tokenizer()
    ids = tok(prompt)["input_ids"]
    assert vocab.unk_id not in ids and tok.decode(ids) == prompt
    assert list(vocab.parse("a2 a0 a1", [3, 3, 3])) == [2, 0, 1]
    assert list(vocab.parse("a2 a0 a1[EOS]", [3, 3, 3])) == [2, 0, 1]
    for bad in ("a2 a0", "a2 a0 a1 a1", "a2 a0 a3", "a2 budget a1", "", "a2 a0 a2"):
        assert vocab.parse(bad, [3, 3, 2]) is None, bad


def test_an_unparsable_completion_gets_the_fixed_low_reward(env):
    agent = agents.make_agent("grpo_lm", env, total_updates=0, invalid_reward=-3.0, budget_constrained=False)
    sink: list = []
    reward = agent.reward_function(agents.EnvLayout(env), "train", sink)
    prompts = ["p"] * 4
    rewards = reward(prompts=prompts, completions=["a0 a0 a0", "a2 a2 a2", "a0 a0", "ms a1 a1"],
                     completion_ids=[[]] * 4, sample_id=[3] * 4, budget_ms=[35.0] * 4)
    expected, _ = group_env(env).evaluate_group(3, 35.0, [[0, 0, 0], [2, 2, 2]], "train")
    assert rewards[:2] == pytest.approx(list(expected)) and rewards[2:] == [-3.0, -3.0]
    assert len(sink) == 2 and all("latency_ms" in i for i in sink)


def test_under_the_budget_constraint_an_overshooting_completion_has_zero_advantage(env):
    """Acting never picks a trajectory predicted to overshoot when one fits, so training scores such a
    completion at its group's mean over the fitting ones instead of its penalty."""
    agent = agents.make_agent("grpo_lm", env, total_updates=0)
    reward = agent.reward_function(agents.EnvLayout(env), "train", [])
    completions = ["a0 a0 a0", "a1 a0 a0", "a2 a2 a2"]
    trajectories = [[0, 0, 0], [1, 0, 0], [2, 2, 2]]
    genv = group_env(env)
    predicted = genv.estimated_latency_ms(3, trajectories, "train")
    assert predicted[0] <= 35.0 and predicted[1] <= 35.0 and predicted[2] > 35.0
    rewards = reward(prompts=["p"] * 3, completions=completions, completion_ids=[[]] * 3, sample_id=[3] * 3,
                     budget_ms=[35.0] * 3)
    expected, _ = genv.evaluate_group(3, 35.0, trajectories, "train")
    assert rewards[:2] == pytest.approx(list(expected[:2]))
    assert rewards[2] == pytest.approx(float(np.mean(expected[:2]))) and expected[2] < rewards[2]


def test_checkpoint_round_trip_is_data_only_and_acts_the_same(env, trained, tmp_path):
    path = trained.save(tmp_path / "lm.safetensors", env)
    assert path.read_bytes()[:8]  # a safetensors file: an 8-byte header length, JSON, tensors
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    json.loads(path.read_bytes()[8: 8 + header_len])
    loaded = agents.load_agent("grpo_lm", path, env)
    genv = group_env(env)
    for sid in range(8):
        ctx = EpisodeContext(genv, sid, 35.0, "test")
        obs = genv.stage_observation(sid, 35.0, "test", 0)
        assert list(loaded.act(obs, ctx)) == list(trained.act(obs, ctx))
    assert loaded.step == UPDATES


def test_save_pretrained_writes_the_hugging_face_layout(trained, tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    out = trained.save_pretrained(tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    ids = tok("budget 3 5 ms obs 0:0.8 act", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, trained.model(input_ids=ids).logits, atol=1e-5)


def test_a_later_stage_follows_the_trajectory_the_episode_chose(env, trained):
    genv = group_env(env)
    obs1 = genv.stage_observation(5, 35.0, "test", 1, [0, 0, 0])
    action = trained.act(obs1, EpisodeContext(genv, 5, 35.0, "test", stage=1, trajectory=(0, 0, 0)))
    assert action[0] == 0


def test_decoding_keeps_to_the_allowed_trajectories(trained):
    prompt = trained.vocab.prompt(np.zeros(trained.obs_dim, dtype=np.float32), 35.0)
    free = trained.decode(prompt)
    only = np.array([[(free[0] + 1) % 3, 2, 1]])
    np.testing.assert_array_equal(trained.decode(prompt, allowed=only), only[0])
    np.testing.assert_array_equal(trained.decode(prompt, allowed=np.zeros((0, 3), dtype=np.int64)), free)
    # a forced earlier element no allowed row has: the rest is decoded unconstrained
    forced = trained.decode(prompt, forced={0: int(free[0])}, allowed=only)
    assert forced[0] == free[0]


def test_acting_picks_a_trajectory_predicted_to_fit_the_budget(env, trained):
    """At a tight and a loose budget, every trajectory acted is one the estimator predicts to fit
    (each input has one that fits here), so the choice moves with the budget."""
    genv = group_env(env)
    latencies = {}
    for budget_ms in (20.0, 50.0):
        chosen = []
        for sid in range(24):
            context = EpisodeContext(genv, sid, budget_ms, "test", stage=0)
            trajectory = trained.act(genv.stage_observation(sid, budget_ms, "test", 0), context)
            predicted = float(genv.estimated_latency_ms(sid, [trajectory], "test")[0])
            assert predicted <= budget_ms or trained.fitting_trajectories(context) is None
            chosen.append(predicted)
        latencies[budget_ms] = np.mean(chosen)
    assert latencies[20.0] < latencies[50.0]
    unconstrained = GRPOLMConfig(budget_constrained=False)
    assert not unconstrained.budget_constrained


@pytest.mark.parametrize("options, accepted", [
    ({"budget_constrained": "yes"}, "true or false"),
    ({"num_generations": 1}, ">= 2"), ({"hidden_size": 66}, "multiple of num_attention_heads"),
    ({"scale_rewards": "x"}, "group (or true), batch"), ({"loss_type": "sum"}, "grpo, dr_grpo, dapo, bnpo"),
    ({"learning_rate": 0}, "finite number > 0"), ({"nope": 1}, "accepted: batch_size"),
])
def test_bad_options_name_the_value_and_what_is_accepted(options, accepted):
    with pytest.raises(ValueError, match="accepted") as err:
        GRPOLMConfig.from_dict(options)
    assert accepted in str(err.value)


def test_train_cli_runs_grpo_lm_and_writes_its_report(workdir):
    result = run_cli("train.py", ["env=MultiKnob-v0", "agent=grpo_lm", *quick(workdir)], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = sorted((workdir / "runs" / "MultiKnob-v0" / "grpo_lm").iterdir())
    report = json.loads((run / "report.json").read_text())
    assert {r["agent"] for r in report["rows"]} >= {"grpo_lm", "oracle", "greedy"}
    ckpt = agents.read_checkpoint(run / "checkpoints" / "latest.safetensors")
    assert ckpt["agent"] == "grpo_lm" and ckpt["metadata"]["step"] == 2 and "model" in ckpt["state"]
    more = [("agent.total_updates=3" if a.startswith("agent.total_updates=") else a) for a in quick(workdir)]
    resumed = run_cli("train.py", ["env=MultiKnob-v0", "agent=grpo_lm", f"resume={run}", *more], workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert agents.read_checkpoint(run / "checkpoints" / "latest.safetensors")["metadata"]["step"] == 3


def test_a_one_stage_discrete_env_trains_and_acts():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        env = gym.make("TokenBudget-v0", backend=TableBackend(), budget=BUDGET, estimator=TableLatency())
    agent = agents.make_agent("grpo_lm", env, total_updates=1, batch_size=2, num_generations=2)
    seen = []

    class Hooks(agents.FitHooks):
        def on_update(self, agent, step, infos, stats):
            seen.append((step, len(infos), stats["invalid_fraction"]))

    agent.fit(env, agents.FitContext(hooks=Hooks()))
    assert seen == [(1, 4, 0.0)]
    result = evaluate_agent(env, agent.freeze(), [0, 1, 2], 35.0, "test")
    assert result["episodes"] == 3
    assert all(i["knobs"]["token_budget"] in (0.25, 0.5, 0.75, 1.0) for i in result["infos"])


def test_one_grpo_lm_trained_over_a_range_follows_the_budget():
    """Trained over [20ms,50ms] (120 updates, seed 0), the one LM controller reaches 85% of the oracle
    at the low, middle and high budget, spending more at the loose end (the stand-in's optimum moves)."""
    env = table_env("[20ms,50ms]")
    agent = agents.make_agent("grpo_lm", env, total_updates=120, seed=0)
    agent.fit(env)
    agent.freeze()
    oracle = agents.make_agent("oracle", env)
    ids = list(range(96))
    p50 = []
    for budget_ms in (20.0, 35.0, 50.0):
        mine = evaluate_agent(env, agent, ids, budget_ms, "test")
        best = evaluate_agent(env, oracle, ids, budget_ms, "test")
        assert mine["reward"] >= 0.85 * best["reward"] and mine["violation_rate"] <= 0.05
        p50.append(mine["latency_p50_ms"])
    assert p50[0] < p50[2]
