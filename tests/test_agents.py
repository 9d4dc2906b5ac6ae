"""Agents: GRPO advantages, loss and two-stage log-probabilities; every baseline on real envs.

The envs run a randomly initialised tiny model (built in code) with short answers and an
analytic stand-in for the latency estimator, so every test exercises the real env and backend
code paths in seconds.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

import agents
import envs  # noqa: F401  (registers the env ids)
from agents.base import EnvLayout, EpisodeContext, evaluate_agent, run_episode
from agents.grpo import GRPOAgent, GRPOConfig, Rollout, group_advantages
from fake_latency import AnalyticEstimator

BUDGET = "80ms"  # what gym.make parses (the boundary)
BUDGET_MS = 80.0  # what agents and evaluations pass past it


@pytest.fixture(scope="module")
def backend(random_tiny_checkpoint):
    from backends.tiny.backend import load_tiny_backend

    return load_tiny_backend(str(random_tiny_checkpoint), generation={"max_new_tokens": 2})


def _make(backend, env_id: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a budget that does not bind the random model is fine here
        return gym.make(env_id, backend=backend, budget=BUDGET, estimator=AnalyticEstimator())


@pytest.fixture(scope="module")
def multiknob(backend):
    return _make(backend, "MultiKnob-v0")


@pytest.fixture(scope="module")
def token_budget(backend):
    return _make(backend, "TokenBudget-v0")


# --------------------------------------------------------------------------------------------- advantages
def test_advantages_are_zero_mean_per_group():
    rewards = np.random.default_rng(0).normal(size=(5, 8))
    for mode in ("group", "batch", "none"):
        adv = group_advantages(rewards, mode)
        np.testing.assert_allclose(adv.mean(axis=1), 0.0, atol=1e-12)
    adv = group_advantages(rewards, "group")
    np.testing.assert_allclose(adv.std(axis=1, ddof=1), rewards.std(axis=1, ddof=1)
                               / (rewards.std(axis=1, ddof=1) + 1e-4), rtol=1e-9)


@pytest.mark.parametrize("mode", ["group", "batch", "none", True, False])
def test_equal_rewards_give_zero_advantage_and_no_nan(mode):
    rewards = np.array([[0.1] * 8, [0.3, 0.7, 0.1, 0.1, 0.9, 0.2, 0.4, 0.5]])
    adv = group_advantages(rewards, mode)
    assert np.all(np.isfinite(adv))
    assert np.all(adv[0] == 0.0)
    assert np.any(adv[1] != 0.0)


def test_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="scale_rewards='std'"):
        group_advantages(np.zeros((2, 4)), "std")
    with pytest.raises(ValueError, match="generations>=2"):
        group_advantages(np.zeros((2, 1)))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(np.array([[0.0, np.nan]]))


# --------------------------------------------------------------------------------------------- GRPO
def test_grpo_config_uses_trl_names_and_validates():
    cfg = GRPOConfig()
    assert (cfg.num_generations, cfg.epsilon, cfg.beta, cfg.scale_rewards, cfg.temperature) == (8, 0.2, 0.0, "group", 1.0)
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"
    with pytest.raises(ValueError, match="num_generations=1"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ValueError, match="epsilon=-0.1"):
        GRPOConfig(epsilon=-0.1)
    with pytest.raises(ValueError, match=r"unknown GRPO option\(s\) \['lr'\]"):
        GRPOConfig.from_dict({"lr": 0.1})


def test_the_cli_grpo_config_is_the_dataclass_defaults():
    """conf/agent/grpo.yaml restates GRPOConfig's defaults for Hydra: one definition, so they must agree."""
    from dataclasses import fields
    from pathlib import Path

    import yaml

    conf = yaml.safe_load((Path(__file__).parent.parent / "conf" / "agent" / "grpo.yaml").read_text())
    defaults = GRPOConfig().as_dict()
    assert set(conf) - {"name"} == {f.name for f in fields(GRPOConfig)}
    assert {k: v for k, v in conf.items() if k not in ("name", "seed")} == \
        {k: v for k, v in defaults.items() if k != "seed"}


def _synthetic_rollout(agent: GRPOAgent, groups: int = 4, seed: int = 0) -> Rollout:
    gen = torch.Generator().manual_seed(seed)
    G, S = agent.config.num_generations, len(agent.stage_heads)
    obs = torch.randn(groups * G, S, agent.obs_dim, generator=gen)
    features = torch.randn(groups * G, S, agent.max_options, 2, generator=gen)
    options = torch.stack([torch.randint(len(o), (groups * G,), generator=gen) for o in agent.stage_options], dim=1)
    actions = torch.zeros(groups * G, len(agent.nvec), dtype=torch.long)
    for s, heads in enumerate(agent.stage_heads):
        actions[:, heads] = torch.as_tensor(agent.stage_options[s])[options[:, s]]
    rewards = torch.rand(groups, G, generator=gen).numpy()
    with torch.no_grad():
        old_logp = agent.trajectory_log_prob(agent.policy, obs, features, options)
    adv = torch.as_tensor(group_advantages(rewards).reshape(-1), dtype=torch.float32)
    return Rollout(obs, features, options, actions, old_logp, adv, rewards, [], G)


@pytest.mark.learning
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_update_decreases_the_loss_on_a_fixed_batch(beta):
    agent = GRPOAgent(obs_dim=6, nvec=[3, 5, 5], stage_heads=[[0], [1, 2]],
                      config=GRPOConfig(num_generations=4, num_iterations=5, beta=beta, learning_rate=1e-2))
    rollout = _synthetic_rollout(agent)
    before, stats = agent.loss(rollout)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-7) and stats["clip_fraction"] == 0.0
    agent.update(rollout)
    after, stats = agent.loss(rollout)
    assert float(after.detach()) < float(before.detach())
    assert stats["kl"] > 0 and np.isfinite(stats["entropy"]) and agent.step == 1


def test_each_stage_is_one_categorical_over_the_joint_options_of_its_heads():
    agent = GRPOAgent(obs_dim=6, nvec=[3, 5, 5], stage_heads=[[0], [1, 2]], config=GRPOConfig(num_generations=2))
    assert [len(o) for o in agent.stage_options] == [3, 25] and agent.max_options == 25
    # option index <-> head values round trip (row-major over the stage's heads)
    rows = np.array([[2, 0, 0], [1, 4, 3], [0, 2, 1]])
    np.testing.assert_array_equal(agent.option_index(1, rows), [0, 23, 11])
    np.testing.assert_array_equal(agent.stage_options[1][agent.option_index(1, rows)], rows[:, 1:])


def test_trajectory_log_prob_reads_each_stage_at_its_own_observation_and_features():
    """Stage-2 options never see the stage-1 observation and vice versa; latency features move logits."""
    agent = GRPOAgent(obs_dim=6, nvec=[3, 5, 5], stage_heads=[[0], [1, 2]], config=GRPOConfig(num_generations=2))
    rollout = _synthetic_rollout(agent, groups=2)
    stages = agent.stage_log_probs(agent.policy, rollout.obs, rollout.features)
    changed_stage2 = rollout.obs.clone()
    changed_stage2[:, 1] += 5.0
    stages2 = agent.stage_log_probs(agent.policy, changed_stage2, rollout.features)
    assert torch.equal(stages[0], stages2[0]) and not torch.equal(stages[1], stages2[1])
    changed_features = rollout.features.clone()
    changed_features[:, 0] += 1.0
    stages3 = agent.stage_log_probs(agent.policy, rollout.obs, changed_features)
    assert not torch.equal(stages[0], stages3[0]) and torch.equal(stages[1], stages3[1])
    total = agent.trajectory_log_prob(agent.policy, rollout.obs, rollout.features, rollout.options)
    by_hand = sum(stages[s].gather(1, rollout.options[:, s:s + 1]).squeeze(1) for s in range(2))
    torch.testing.assert_close(total, by_hand)


@pytest.mark.parametrize("prior", [50.0, 0.0])
def test_the_feasibility_prior_starts_the_policy_on_options_that_fit(prior):
    """With the prior, an option predicted 10% over budget (cheapest completion) starts e^-5 times as
    likely as one that fits; without it, both start near-uniform. The prior's weight is learned."""
    agent = GRPOAgent(obs_dim=6, nvec=[3, 5, 5], stage_heads=[[0], [1, 2]],
                      config=GRPOConfig(num_generations=2, feasibility_prior=prior))
    features = torch.zeros(agent.max_options, 2)
    features[0] = torch.tensor([np.log(1.1), np.log(1.3)])  # tier 0 overshoots even at its cheapest
    features[1] = torch.tensor([np.log(0.9), np.log(1.3)])  # tier 1 fits with a cheap completion
    probs = agent._stage_log_probs(agent.policy, torch.zeros(6), features, 0).exp()
    ratio = float(probs[0] / probs[1])
    if prior:
        assert ratio == pytest.approx(np.exp(-prior * np.log(1.1)), rel=0.2)
    else:
        assert 0.8 < ratio < 1.25
    assert agent.policy.overshoot_weights.requires_grad
    with pytest.raises(ValueError, match="feasibility_prior=-1"):
        GRPOConfig(feasibility_prior=-1)


def test_grpo_collects_two_stage_groups_on_multiknob(multiknob):
    agent = agents.make_agent("grpo", multiknob, config={"num_generations": 4, "batch_size": 2})
    layout = EnvLayout(multiknob)
    assert layout.stage_heads == [[0], [1, 2]]
    rollout = agent.collect(layout, [3, 5], [70.0, 90.0], "train")
    assert rollout.obs.shape == (8, 2, multiknob.observation_space.shape[0]) and rollout.rewards.shape == (2, 4)
    for g, (sample_id, budget_ms) in enumerate([(3, 70.0), (5, 90.0)]):
        rows = range(4 * g, 4 * g + 4)
        assert {rollout.infos[i]["sample_id"] for i in rows} == {sample_id}
        assert {rollout.infos[i]["budget_ms"] for i in rows} == {budget_ms}
        for i in rows:  # each trajectory's stage-2 observation is the one of the tier it chose
            tier = int(rollout.actions[i, 0])
            expected = multiknob.unwrapped.stage_observation(sample_id, budget_ms, "train", 1, [tier])
            np.testing.assert_array_equal(rollout.obs[i, 1].numpy(), expected)
            assert rollout.infos[i]["knobs"]["tier"] == multiknob.unwrapped.space.tier_names[tier]
            # the stage-2 options' latency features are this input's estimates for that tier
            expected_features = agent.latency_features(layout, sample_id, budget_ms, "train", 1,
                                                       rollout.actions[i].numpy())
            np.testing.assert_array_equal(rollout.features[i, 1].numpy(), expected_features)
    rollout2, stats = agent.train_step(layout, layout.env.budget)
    assert agent.step == 1 and {"loss", "kl", "entropy", "clip_fraction", "samples_per_second"} <= set(stats)


def test_grpo_checkpoint_round_trip_restores_policy_and_rngs(multiknob, tmp_path):
    agent = agents.make_agent("grpo", multiknob, config={"num_generations": 2, "batch_size": 1, "seed": 3})
    agent.update(_synthetic_rollout(agent, groups=1))
    agent.save(tmp_path / "grpo.safetensors", multiknob)
    loaded = agents.load_agent("grpo", tmp_path / "grpo.safetensors", multiknob)
    obs = multiknob.unwrapped.stage_observation(0, 80.0, "test", 0)
    context = EpisodeContext(multiknob.unwrapped, 0, 80.0, "test", 0)
    np.testing.assert_array_equal(agent.act(obs, context), loaded.act(obs, context))
    assert loaded.step == agent.step == 1
    assert loaded.rng.integers(1 << 30) == agent.rng.integers(1 << 30)


# --------------------------------------------------------------------------------------------- baselines
OPTIONS = {"ppo": {"total_timesteps": 8, "n_steps": 4, "batch_size": 4}, "bandit": {"rounds": 4},
           "static": {"calibration_samples": 1}, "grpo": {"total_updates": 0}}


@pytest.mark.parametrize("env_name", ["multiknob", "token_budget"])
@pytest.mark.parametrize("name", ["random", "static", "greedy", "bandit", "oracle", "ppo", "grpo"])
def test_each_agent_runs_saves_and_loads(request, env_name, name, tmp_path):
    env = request.getfixturevalue(env_name)
    agent = agents.make_agent(name, env, **OPTIONS.get(name, {}))
    agent.fit(env, agents.FitContext(budgets_ms=[BUDGET_MS]))
    result = evaluate_agent(env, agent, [0, 1], BUDGET_MS, "test")
    assert result["episodes"] == 2 and 0.0 <= result["violation_rate"] <= 1.0
    assert all(i["knobs"]["tier"] in env.unwrapped.space.tier_names and i["sample_id"] in (0, 1)
               for i in result["infos"])
    if name not in agents.evaluation_only():
        agent.save(tmp_path / f"{name}.safetensors", env)
        loaded = agents.load_agent(name, tmp_path / f"{name}.safetensors", env)
        again = evaluate_agent(env, loaded, [0, 1], BUDGET_MS, "test")
        if name != "random":  # a random agent's draws continue from its saved generator, not repeat
            assert [i["knobs"] for i in again["infos"]] == [i["knobs"] for i in result["infos"]]


def test_greedy_takes_the_most_expensive_configuration_that_fits(multiknob):
    greedy = agents.make_agent("greedy", multiknob)
    base = multiknob.unwrapped
    actions, est = greedy.estimates(base, 2, "test")
    for budget_ms in (est.min() - 1, np.median(est), est.max() + 1):
        chosen = greedy.act(None, EpisodeContext(base, 2, float(budget_ms), "test"))
        index = int(np.flatnonzero((actions == chosen).all(axis=1))[0])
        fitting = est[est <= budget_ms]
        assert est[index] == (fitting.max() if len(fitting) else est.min())


def test_static_picks_the_best_mean_reward_per_budget(multiknob):
    static = agents.make_agent("static", multiknob)
    layout = EnvLayout(multiknob)
    static.calibrate(multiknob, [60.0, 100.0], [0, 1], "validation")
    for budget_ms in (60.0, 100.0):
        mean = np.mean([layout.evaluate(s, budget_ms, layout.all_actions(), "validation")[0] for s in (0, 1)], axis=0)
        chosen = static.action_for(budget_ms)
        assert mean[int(np.flatnonzero((layout.all_actions() == chosen).all(axis=1))[0])] == mean.max()
    np.testing.assert_array_equal(static.action_for(95.0), static.action_for(100.0))  # nearest fitted budget


def test_oracle_is_an_upper_bound_per_sample(multiknob):
    oracle = agents.make_agent("oracle", multiknob)
    others = [agents.make_agent("random", multiknob, seed=1), agents.make_agent("greedy", multiknob)]
    for sample_id in (0, 1):
        best = run_episode(multiknob, oracle, sample_id, 80.0, "test")["reward"]
        for agent in others:
            assert run_episode(multiknob, agent, sample_id, 80.0, "test")["reward"] <= best + 1e-12


def test_context_agents_explain_what_they_need(multiknob):
    with pytest.raises(ValueError, match="needs an EpisodeContext"):
        agents.make_agent("greedy", multiknob).act(np.zeros(multiknob.observation_space.shape, np.float32))
    with pytest.raises(ValueError, match="unknown agent 'nope'; accepted: bandit, .*greedy, grpo"):
        agents.make_agent("nope", multiknob)
    with pytest.raises(ValueError, match=r"unknown bandit option\(s\) \['gamma'\]"):
        agents.make_agent("bandit", multiknob, gamma=1.0)


# --------------------------------------------------------------------------------------------- contracts
def test_agents_use_the_env_budget_and_the_group_protocol(multiknob):
    from envs.protocols import GroupEnv

    base = multiknob.unwrapped
    assert isinstance(base, GroupEnv) and base.stage_heads == ((0,), (1, 2))
    layout = EnvLayout(multiknob)
    assert layout.nvec == list(multiknob.action_space.nvec) and layout.env.budget is base.budget
    # the stage query is pure: an episode in progress is untouched by it
    obs0, _ = multiknob.reset(options={"sample_id": 4, "budget": 70.0, "split": "test"})
    base.stage_observation(9, 120.0, "train", 1, [1, 0, 0])
    obs1, reward, terminated, _, info = multiknob.step([2, 1, 1])
    fresh = base.stage_observation(4, 70.0, "test", 1, [2, 0, 0])
    np.testing.assert_array_equal(obs1, fresh)
    _, _, done, _, info = multiknob.step([2, 1, 1])
    assert done and info["sample_id"] == 4 and info["budget_ms"] == 70.0


def test_grpo_fit_owns_its_loop_and_calls_the_hooks_in_order(multiknob):
    calls = []

    class Recorder(agents.FitHooks):
        def on_fit_start(self, agent, step, total):
            calls.append(("start", step, total))

        def on_update(self, agent, step, infos, stats):
            calls.append(("update", step, len(infos)))

        def on_fit_end(self, agent, step):
            calls.append(("end", step))

    agent = agents.make_agent("grpo", multiknob, total_updates=2, batch_size=1, num_generations=2)
    stats = agent.fit(multiknob, agents.FitContext(hooks=Recorder()))
    assert calls == [("start", 0, 2), ("update", 1, 2), ("update", 2, 2), ("end", 2)]
    assert stats == {"updates": 2} and agent.step == 2


def test_checkpoints_are_data_only_and_checked(multiknob, token_budget, tmp_path):
    from backends.io import CorruptFileError, load_tensors

    agent = agents.make_agent("grpo", multiknob, num_generations=2)
    path = agent.save(tmp_path / "grpo.safetensors", multiknob)
    tensors, meta = load_tensors(path)  # a plain safetensors file with JSON metadata: nothing to unpickle
    assert meta["agent"] == "grpo" and meta["env_id"] == "MultiKnob-v0" and tensors
    with pytest.raises(ValueError, match="holds a 'grpo' agent, not 'bandit'"):
        agents.load_agent("bandit", path, multiknob)
    with pytest.raises(ValueError, match="trained on env 'MultiKnob-v0', not 'TokenBudget-v0'"):
        agents.load_agent("grpo", path, token_budget)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CorruptFileError, match="damaged.safetensors"):
        agents.load_agent(None, damaged, multiknob)
    pickled = tmp_path / "old.pt"
    torch.save({"agent": "grpo"}, pickled)
    with pytest.raises(CorruptFileError, match="old.pt"):
        agents.load_agent(None, pickled, multiknob)


def test_ppo_checkpoint_holds_the_policy_weights_not_a_zip(token_budget, tmp_path):
    from backends.io import load_tensors

    agent = agents.make_agent("ppo", token_budget, total_timesteps=8, n_steps=4, batch_size=4)
    agent.fit(token_budget)
    path = agent.save(tmp_path / "ppo.safetensors", token_budget)
    tensors, meta = load_tensors(path)
    assert "sb3_zip" not in str(meta) and len(tensors) == len(agent.model.policy.state_dict())
    loaded = agents.load_agent("ppo", path, token_budget)
    for key, value in agent.model.policy.state_dict().items():
        torch.testing.assert_close(loaded.model.policy.state_dict()[key], value)
