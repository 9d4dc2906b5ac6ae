"""StreamingKV-v0: pick KV-cache policy knobs chunk by chunk while streaming a long document.

An episode streams one held-out document window (``episode_tokens`` tokens from a seeded random
document and offset) through a causal LM token by token (teacher forcing). Each step decodes the
next ``chunk_tokens`` tokens under the policy knobs chosen by the action; the reward is the shared
:func:`envs.reward.compute_reward` of

* ``score = clip(1 - mean_chunk_nll / log(vocab_size), 0, 1)``: the fraction of a uniform guess's
  NLL the model removes (a monotone transform of the negative mean chunk NLL into [0, 1]);
* the chunk's time per output token (TPOT, ms) against the episode's per-token budget
  (:class:`envs.budget.Budget`, e.g. ``"4ms"`` or ``"[2ms,6ms]"``).

Latency modes (``latency=``):

* ``"estimated"`` (default): TPOT from :class:`backends.kv.latency.TpotModel`, a linear model in
  the attended cache length plus a prune overhead. Deterministic for a given ``tpot_model``; when
  none is given it is fitted once per process and model on this machine.
* ``"measured"``: the wall-clock median forward time of the chunk (nondeterministic).

Action: one ``MultiDiscrete`` entry per policy field, in field order, indexing the field's
``knob_choices``. Observation (float32): last chunk's mean / max / std NLL, episode mean NLL so
far, cache length, tokens since the last prune, the budget (ms), last TPOT / budget, progress.

Every registered KV policy gets an env ``KV-<PolicyName>-v0``; ``StreamingKV-v0`` is the
StreamingLLM policy (:class:`~backends.kv.policies.SinkWindow`). :func:`register_kv_envs` registers
them all (idempotent) and keeps registering policies added later.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from functools import lru_cache

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from backends.kv.latency import TpotModel, fit_tpot_model
from backends.kv.policies import KVPolicy, kv_policy_class, on_kv_policy_registered, registered_kv_policies
from backends.kv.stream import DocumentStreamer
from backends.tiny_text import CHECKPOINT_DIR, held_out_token_documents, load_causal_lm
from envs.budget import Budget
from envs.registry import register_env
from envs.reward import RewardConfig, compute_reward

LATENCY_MODES = ("estimated", "measured")
OBSERVATION_NAMES = ("chunk_mean_nll", "chunk_max_nll", "chunk_std_nll", "episode_mean_nll", "cache_length",
                     "tokens_since_prune", "budget_ms", "tpot_over_budget", "progress")
STREAMING_KV_ID = "StreamingKV-v0"
MAX_OBSERVED_NLL = 50.0  # NLL features are clipped here (nats); a uniform guess over 2^21 tokens is ~14.6
MAX_TPOT_OVER_BUDGET = 100.0


@lru_cache(maxsize=2)
def _load_model(model_path: str | None):
    # Loaded once per process and path: every env instance shares the weights (read-only use).
    return load_causal_lm(model_path if model_path is not None else CHECKPOINT_DIR)


# Estimated-mode coefficients fitted once per loaded model in this process.
_FITTED_TPOT: "weakref.WeakKeyDictionary[object, TpotModel]" = weakref.WeakKeyDictionary()


class StreamingKVEnv(gym.Env):
    """Stream a document under per-chunk KV policy knobs (see module docstring).

    Args:
        policy: registered policy name or class (default ``"SinkWindow"``).
        budget: per-token latency budget, any form :meth:`Budget.parse` accepts.
        chunk_tokens: tokens decoded per step.
        episode_tokens: tokens predicted per episode (a multiple of ``chunk_tokens`` is natural).
        latency: ``"estimated"`` (default, deterministic) or ``"measured"``.
        tpot_model: coefficients for the estimated mode (a :class:`TpotModel` or its dict);
            ``None`` fits one on first use.
        model_path: checkpoint folder of a causal LM; ``None`` = the tiny reference model.
        model, documents: an already loaded causal LM and its token-id documents (tests, custom
            data); with a custom ``model`` the ``documents`` are required.
        reward_config: coefficients of the shared reward.
    """

    metadata = {"render_modes": []}

    def __init__(self, policy="SinkWindow", budget="4ms", chunk_tokens: int = 32, episode_tokens: int = 512,
                 latency: str = "estimated", tpot_model: TpotModel | dict | None = None,
                 model_path: str | None = None, model=None, documents=None,
                 reward_config: RewardConfig | dict | None = None):
        super().__init__()
        self.policy_class = kv_policy_class(policy) if isinstance(policy, str) else policy
        if not (isinstance(self.policy_class, type) and issubclass(self.policy_class, KVPolicy)):
            raise ValueError(f"policy={policy!r} is invalid; accepted: a registered KV policy name or class")
        self.budget = Budget.parse(budget)
        for name, value in (("chunk_tokens", chunk_tokens), ("episode_tokens", episode_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; accepted: an integer >= 1")
        if latency not in LATENCY_MODES:
            raise ValueError(f"latency={latency!r} is invalid; accepted: {', '.join(LATENCY_MODES)}")
        self.chunk_tokens, self.episode_tokens, self.latency = chunk_tokens, episode_tokens, latency
        self.reward_config = (RewardConfig(**reward_config) if isinstance(reward_config, dict)
                              else reward_config or RewardConfig())

        if model is None:
            model, tokenizer = _load_model(model_path)
            if documents is None:
                documents = list(held_out_token_documents(tokenizer).values())
        elif documents is None:
            raise ValueError("documents=None with a custom model; accepted: a list of token-id sequences")
        self.model = model
        self.documents = [list(map(int, doc)) for doc in documents if len(doc) >= episode_tokens + 1]
        if not self.documents:
            raise ValueError(f"no document has episode_tokens+1={episode_tokens + 1} tokens; accepted: documents "
                             "at least that long (or a smaller episode_tokens)")
        self.vocab_size = model.config.get_text_config(decoder=True).vocab_size
        if isinstance(tpot_model, dict):
            tpot_model = TpotModel(**tpot_model)
        if tpot_model is not None and not isinstance(tpot_model, TpotModel):
            raise ValueError(f"tpot_model={tpot_model!r} is invalid; accepted: None, a TpotModel or its dict")
        self._tpot_model = tpot_model

        self.knob_names = [f.name for f in dataclasses.fields(self.policy_class)]
        self.knob_choices = [tuple(self.policy_class.knob_choices[name]) for name in self.knob_names]
        self.action_space = spaces.MultiDiscrete([len(c) for c in self.knob_choices])
        # True upper bounds: the cache never holds more than the tokens fed in an episode.
        high = np.array([MAX_OBSERVED_NLL] * 4 + [episode_tokens + 1] * 2
                        + [self.budget.high_ms, MAX_TPOT_OVER_BUDGET, 1.0], dtype=np.float32)
        self.observation_space = spaces.Box(low=np.zeros_like(high), high=high, dtype=np.float32)
        self._streamer: DocumentStreamer | None = None

    # --- knobs ------------------------------------------------------------------------------
    def policy_for(self, action) -> KVPolicy:
        """The policy an action selects (raises ``ValueError`` for an action outside the space)."""
        action = np.asarray(action)
        if action.shape != self.action_space.shape or not self.action_space.contains(action.astype(np.int64)):
            raise ValueError(f"action={action.tolist()!r} is invalid; accepted: integers in [0, n) for n in "
                             f"{self.action_space.nvec.tolist()} ({', '.join(self.knob_names)})")
        knobs = {name: choices[int(i)] for name, choices, i in zip(self.knob_names, self.knob_choices, action)}
        return self.policy_class(**knobs)

    @property
    def tpot_model(self) -> TpotModel:
        """The estimated-mode latency model (fitted once per process and model when not given)."""
        if self._tpot_model is None:
            if self.model not in _FITTED_TPOT:
                _FITTED_TPOT[self.model] = fit_tpot_model(self.model)
            self._tpot_model = _FITTED_TPOT[self.model]
        return self._tpot_model

    # --- Gymnasium API ----------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        doc_index = int(self.np_random.integers(len(self.documents)))
        document = self.documents[doc_index]
        start = int(self.np_random.integers(len(document) - self.episode_tokens))
        self._budget_ms = self.budget.sample(self.np_random)
        self._streamer = DocumentStreamer(self.model, document[start:start + self.episode_tokens + 1])
        self._episode_nll: list[float] = []
        self._last_nll = np.zeros(1)
        self._last_tpot = 0.0
        info = {"document": doc_index, "start": start, "budget_ms": self._budget_ms}
        return self._observation(), info

    def step(self, action):
        if self._streamer is None:
            raise ValueError("step() called before reset(); accepted: call reset() first")
        if self._streamer.remaining == 0:
            raise ValueError("step() called after the episode ended; accepted: call reset() first")
        policy = self.policy_for(action)
        trace = self._streamer.advance(self.chunk_tokens, policy)
        prune_steps = np.zeros(trace.num_tokens)
        first_seen = self._streamer.cursor - trace.num_tokens
        for event in trace.prune_events:
            prune_steps[event.seen_tokens - 1 - first_seen] = 1.0
        estimated = self.tpot_model.predict(trace.cache_length, prune_steps) if self.latency == "estimated" else None
        tpot_ms = float(np.mean(estimated)) if estimated is not None else float(np.median(trace.step_ms))

        mean_nll = float(trace.nll.mean())
        score = float(np.clip(1.0 - mean_nll / math.log(self.vocab_size), 0.0, 1.0))
        reward, violated = compute_reward(score, tpot_ms, self._budget_ms, self.reward_config)
        self._episode_nll.extend(trace.nll.tolist())
        self._last_nll, self._last_tpot = trace.nll, tpot_ms
        terminated = self._streamer.remaining == 0
        # Wall-clock figures appear in info only in measured mode, so estimated mode stays deterministic.
        info = {
            "policy": str(policy), "knobs": policy.knobs(), "nll": trace.nll.copy(), "mean_nll": mean_nll,
            "score": score, "tpot_ms": tpot_ms, "latency_mode": self.latency, "budget_ms": self._budget_ms, "violated": violated,
            "cache_length": trace.cache_length.copy(),
            "prune_events": [dataclasses.asdict(e) for e in trace.prune_events],
        }
        if self.latency == "measured":
            info["step_ms"] = trace.step_ms.copy()
        return self._observation(), reward, terminated, False, info

    def _observation(self) -> np.ndarray:
        cache = self._streamer.cache
        nll = self._last_nll
        episode = float(np.mean(self._episode_nll)) if self._episode_nll else 0.0
        progress = self._streamer.cursor / self.episode_tokens
        nll_stats = np.clip([nll.mean(), nll.max(), nll.std(), episode], 0.0, MAX_OBSERVED_NLL)
        return np.array([*nll_stats, cache.cache_length, cache.tokens_since_prune, self._budget_ms,
                         min(self._last_tpot / self._budget_ms, MAX_TPOT_OVER_BUDGET), progress], dtype=np.float32)


def kv_env_id(policy_class: type[KVPolicy]) -> str:
    """The env id generated for a policy class: ``KV-<PolicyName>-v0``."""
    return f"KV-{policy_class.policy_name()}-v0"


def _register_policy_env(policy_class: type[KVPolicy]) -> str:
    fields = ", ".join(f.name for f in dataclasses.fields(policy_class))
    return register_env(kv_env_id(policy_class), StreamingKVEnv, policy=policy_class.policy_name(),
                        description=f"stream a document choosing {policy_class.policy_name()} knobs ({fields}) per chunk")


def register_kv_envs() -> list[str]:
    """Register ``StreamingKV-v0`` and ``KV-<Policy>-v0`` for every registered policy (idempotent).

    Policies registered later get their env id at registration time.
    """
    ids = [register_env(STREAMING_KV_ID, StreamingKVEnv, policy="SinkWindow",
                        description="StreamingLLM sinks + window with lazy pruning, knobs chosen per chunk")]
    ids += [_register_policy_env(cls) for cls in registered_kv_policies().values()]
    on_kv_policy_registered(_register_policy_env)
    return ids
