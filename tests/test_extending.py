"""Extending knobgym: a new env (one class) and a new agent (one class), defined in this file
alone and run through ``gym.make``, ``train.py`` and ``evaluate.py`` (in-process), with no other file
touched: the CLI names this module (``env=test_extending:DepthOnly-v0``, Gymnasium's
``module:Env-v0`` form, and ``agent=test_extending:cheapest``) and imports it.

The same code is the README's "Extending knobgym" example; the CLI run uses a randomly
initialised tiny model and the analytic stand-in latency (``tests/fake_latency.py``), so nothing
is profiled.
"""

from __future__ import annotations

import json
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import envs
from agents import Agent, EnvLayout, evaluate_agent, make_agent, register_agent
from backends.knobs import KnobConfig, register_model_family
from backends.registry import register_backend
from envs.knob_env import KnobEnv
from fake_latency import AnalyticEstimator


# ------------------------------------------------------------------ a new env: one file
class DepthOnlyEnv(KnobEnv):
    """``DepthOnly-v0``: one step choosing how many decoder blocks run (highest tier, own top-k).

    Action: ``Discrete(len(depths))`` indexing the backend's depth choices. Observation: the
    knob envs' input features (budget, prompt length, question type, image size). Reward: the
    shared reward. Episode end: after the one step.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.action_space = gym.spaces.Discrete(len(self.space.depths))
        self.trajectory_nvec, self.stage_heads = (len(self.space.depths),), ((0,),)
        self.obs_size = self.input_feature_dim
        self.observation_space = self._box(self.obs_size)

    def action_to_knobs(self, action) -> KnobConfig:
        return KnobConfig(tier=self.space.tier_names[-1], depth=self.space.depths[int(action)])

    def stage_observation(self, sample_id, budget_ms, split, stage=0, trajectory=None) -> np.ndarray:
        sample = self.backend.sample(split, sample_id)
        return self.clip_observation(self._input_features(sample, budget_ms), self.obs_size)

    def reset(self, *, seed=None, options=None):
        self._begin_episode(seed, options)
        obs = self.stage_observation(self._sample.sample_id, self._budget_ms, self._sample.split)
        return obs, {"sample_id": self._sample.sample_id, "budget_ms": self._budget_ms}

    def step(self, action):
        outcome = self._run(self._sample, self.action_to_knobs(self.check_action(action)))
        reward, info = self._score(outcome, self._budget_ms)
        info["sample_id"] = self._sample.sample_id
        obs = self.stage_observation(self._sample.sample_id, self._budget_ms, self._sample.split)
        return obs, reward, True, False, info


envs.register_env("DepthOnly-v0", DepthOnlyEnv, description="one step: decoder depth")


# ------------------------------------------------------------------ a new agent: one file
@register_agent
class CheapestAgent(Agent):
    """The trajectory with the lowest estimated latency on this input (never violates if anything fits)."""

    name = "cheapest"
    needs_context = True

    def act(self, obs, context=None):
        actions = EnvLayout(context.env).all_actions()
        latency = context.env.estimated_latency_ms(context.sample_id, actions, context.split)
        return actions[int(np.argmin(latency))]


# ------------------------------------------------------------------ a new backend: one factory
def load_halfway_backend(**options):
    """The tiny backend with its answers cut to two tokens: any factory returning a Backend works."""
    from backends.tiny.backend import load_tiny_backend

    return load_tiny_backend(generation={"max_new_tokens": 2}, **options)


register_backend("halfway-tiny", load_halfway_backend)


# ------------------------------------------------------------------ a new model family: where its parts are
class WrappedCausalLM(torch.nn.Module):
    """A causal LM whose decoder sits at ``backbone`` and LM head at ``head`` (names no shipped family uses)."""

    def __init__(self, inner):
        super().__init__()
        self.backbone, self.head, self.config = inner.model, inner.lm_head, inner.config


register_model_family("WrappedCausalLM", decoder="backbone", lm_head="head")


# ------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def backend(random_tiny_checkpoint):
    from backends.tiny.backend import load_tiny_backend

    return load_tiny_backend(str(random_tiny_checkpoint), generation={"max_new_tokens": 2})


def test_new_env_and_agent_through_gym_make(backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random model's latency range need not contain 80ms
        env = gym.make("DepthOnly-v0", backend=backend, budget="80ms", estimator=AnalyticEstimator())
    check_env(env.unwrapped, skip_render_check=True)
    agent = make_agent("cheapest", env)
    result = evaluate_agent(env, agent, [0, 1], 80.0, "test")
    cheapest_depth = min(env.unwrapped.space.depths)
    assert result["episodes"] == 2 and all(i["knobs"]["depth"] == cheapest_depth for i in result["infos"])
    oracle = evaluate_agent(env, make_agent("oracle", env), [0, 1], 80.0, "test")
    assert oracle["reward"] >= result["reward"] - 1e-12


def test_new_env_and_agent_through_train_and_evaluate(tmp_path, random_tiny_checkpoint, monkeypatch):
    import evaluate
    import train

    runs = tmp_path / "runs"
    argv = ["train.py", "env=test_extending:DepthOnly-v0", "agent=test_extending:cheapest", f"runs_dir={runs}",
            f"backend.checkpoint={random_tiny_checkpoint}", "backend.generation={max_new_tokens:2}",
            "estimator=fake_latency:make", "budget=80ms", "eval.num_samples=2", "eval.validation_samples=1",
            "eval.baselines=[oracle,greedy]"]
    monkeypatch.setattr(sys, "argv", argv)
    train.cli()
    (run,) = (runs / "DepthOnly-v0" / "cheapest").iterdir()
    report = json.loads((run / "report.json").read_text())
    assert {r["agent"] for r in report["rows"]} == {"cheapest", "oracle", "greedy"}
    assert (run / "checkpoints" / "best.safetensors").is_file()
    out = tmp_path / "eval"
    monkeypatch.setattr(sys, "argv", ["evaluate.py", f"run={run}", "env_id=test_extending:DepthOnly-v0",
                                      "budgets=[80ms]", "baselines=[greedy]", f"out={out}", "estimator=fake_latency:make"])
    evaluate.cli()
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert {r["agent"] for r in rows} == {"cheapest", "greedy"}
    assert rows == [r for r in rows if r["budget_ms"] == 80.0]


def test_new_backend_through_gym_make(random_tiny_checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        env = gym.make("DepthOnly-v0", backend={"name": "halfway-tiny", "checkpoint": str(random_tiny_checkpoint)},
                       budget="80ms", estimator=AnalyticEstimator()).unwrapped
    env.reset(seed=0)
    assert env.step(0)[4]["new_tokens"] <= 2


def test_new_model_family_gets_the_depth_knob():
    from transformers import LlamaConfig, LlamaForCausalLM

    from backends.knobs import apply_knobs, knob_space_from_model, model_parts

    torch.manual_seed(0)
    inner = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    model = WrappedCausalLM(inner)
    parts = model_parts(model)
    assert parts.text_decoder is inner.model and parts.lm_head is inner.lm_head
    space = knob_space_from_model(model)
    ran = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(inner.model.layers)]
    with apply_knobs(model, KnobConfig(depth=min(space.depths)), space):
        inner(torch.tensor([[1, 2, 3]]))
    for handle in handles:
        handle.remove()
    assert len(ran) == min(space.depths) < len(inner.model.layers)
