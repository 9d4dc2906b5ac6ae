"""StreamingKV-v0 and KV-<Policy>-v0: pick KV-cache policy knobs chunk by chunk while streaming a document.

An episode streams one document window of ``episode_tokens`` tokens through a causal LM token by
token (teacher forcing). Each step decodes the next ``chunk_tokens`` tokens under the policy knobs
the action picks.

Episodes (a fixed document stream): the documents are cut into consecutive, non-overlapping
windows of ``episode_tokens + 1`` tokens, numbered in document order; window ``i`` belongs to
``validation`` if ``i % 5 == 3``, to ``test`` if ``i % 5 == 4``, else to ``train``. ``sample_id``
is the window's index within its split (:meth:`StreamingKVEnv.num_samples` per split).
When the model's tokenizer puts a BOS before every text (Llama's ``<s>``, the text LM v2's
``<|endoftext|>``), every episode starts with it, as a new document's stream does (the attention
sink a ``SinkWindow`` keeps), followed by ``episode_tokens`` document tokens
(:mod:`envs.kv_data`, ``env.stream_prefix``).

Action: ``MultiDiscrete``, one entry per knob of the env's action grid
(:func:`envs.kv_grid.kv_action_grid`: field name -> the values offered; the grid lives with the
envs, not on the policy class),
in grid order. Only integer actions are accepted (an integral float such as ``2.0`` counts as
the integer); anything else is one ``ValueError`` naming the action and the space. ``step`` also
takes a whole trajectory vector (``episode_steps * H`` elements, see "Groups") and reads the
current chunk's slice of it, as the two-stage knob envs read their stage's elements.

Observation (float32, :data:`OBSERVATION_NAMES`): last chunk's mean / max / std NLL, the
episode's mean NLL so far, cache length, tokens since the last prune, the TPOT budget (ms),
last TPOT / budget, progress, the KV cap in tokens (0 = no cap).

Reward: the shared :func:`envs.reward.compute_reward` of

* ``score = clip(1 - mean_chunk_nll / log(vocab_size), 0, 1)``: the fraction of a uniform guess's
  NLL the model removes (a monotone transform of the negative mean chunk NLL into [0, 1]);
* the chunk's mean time per output token (TPOT, ms) against the episode's TPOT budget;

plus, when the budget has a KV cap (:class:`envs.budget.KVBudget`, e.g. ``20ms+256tok``), the same
penalty applied to the cache: ``compute_reward(0, peak_kv / cap, 1)``, where ``peak_kv`` is the
most tokens the cache held during the chunk (the new token included, before a prune): 0 within
the cap, ``-(overshoot_penalty * (peak_kv / cap - 1) + violation_penalty)`` over it. ``info``
says which limit was violated (``violated``, ``tpot_violated``, ``kv_violated``).

Latency modes (:data:`latency_model.modes.LATENCY_MODES`):

* ``estimated`` (default): TPOT from the model's :class:`latency_model.tpot.TpotEstimator`,
  profiled once per device and cached, so an episode gets the same rewards in every process
  (its profile's noise is in the budget warning and in ``reset``'s info, ``tpot_noise_pct``);
* ``measured``: the wall-clock median forward time of the chunk (nondeterministic); the
  estimator still gives the achievable range and the suggested budget.

Budget: ``budget=None`` (default) or ``"auto"`` uses :attr:`StreamingKVEnv.suggested_budget_ms`, a
TPOT budget that binds on this device; ``"50%"`` is the point halfway across the achievable TPOT
range (0% the cheapest configuration, 100% the most expensive), ``"[25%,75%]"`` a range of two such
points; the same forms as the knob envs (:func:`envs.budget.device_budget`), resolved once when the
env is made (``env.kv_budget`` records the result) or at ``reset``, and a KV cap can follow any of
them (``"50%+256tok"``). A fixed budget outside the achievable TPOT range is warned about once, with
the range and the suggestion.

Groups (:class:`envs.protocols.GroupEnv`, what GRPO and the baselines use; deterministic in
estimated mode): an episode of ``C = episode_steps`` chunks with ``H`` knobs is ``C`` stages over
a trajectory vector of ``C * H`` elements, stage ``c`` reading elements ``c*H .. (c+1)*H - 1``
(``to_env_action``). ``stage_observation`` replays the earlier chunks' decisions of a trajectory;
``evaluate_group`` scores whole-episode trajectories (the return, i.e. the sum of chunk rewards,
and the last step's info); ``estimated_latency_ms`` is the mean TPOT per token of a trajectory
from its simulated cache schedule (:func:`envs.kv_schedule.simulate_schedule`, the policy's own schedule, no model run), the figure the
reward compares with the budget. ``env.budget`` is the TPOT :class:`~envs.budget.Budget` agents
draw budgets from; ``env.kv_budget`` the whole :class:`~envs.budget.KVBudget` (a budget passed
without a cap, as agents pass one, keeps the env's cap). In estimated mode chunk outcomes are
memoised per (episode, decision prefix) together with snapshots of the stream, so trajectories
that share a prefix stream it once, across groups, observation queries and budgets.
:meth:`StreamingKVEnv.evaluate_episode_group` is the same for action sequences with an explicit
KV budget; :meth:`StreamingKVEnv.evaluate_chunk_group` scores candidate actions for the next
chunk from the current cache without advancing.

Episode end: ``terminated`` after ``episode_tokens // chunk_tokens`` steps (a last, shorter chunk
when it does not divide); never truncated. The last step's info also summarises the episode
(:func:`episode_summary`): ``score`` and ``violated`` become episode-level (the chunk's own move to
``chunk_score`` / ``chunk_violated``), plus ``latency_ms`` (mean TPOT per token),
``violated_chunks`` and ``episode_reward``.

Env ids: :func:`envs.kv_registration.register_kv_envs` registers ``StreamingKV-v0`` (the StreamingLLM policy,
:class:`~backends.kv.policies.SinkWindow`) and ``KV-<Policy>-v0`` for every registered policy
(``import envs`` calls it; call it again after registering a policy later).

This module holds the env class; its parts live one job per file: the action grid
(:mod:`envs.kv_grid`), the model and document windows (:mod:`envs.kv_data`), the cache schedule
without a model (:mod:`envs.kv_schedule`), chunk records and the episode summary
(:mod:`envs.kv_scoring`), the prefix memo (:mod:`envs.kv_memo`) and the env ids
(:mod:`envs.kv_registration`); the shared env scaffolding is :mod:`envs.base`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import numpy as np
from gymnasium import spaces

from backends.base import check_split
from backends.checks import check_int
from backends.kv.policies import FullCache, KVPolicy, kv_policy_class, registered_kv_policies
from backends.kv.cache import DEFAULT_STORAGE, STORAGES, kv_bytes_per_token
from backends.kv.sources import check_kv_sources, load_kv_model, read_text_documents, tokenize_documents
from backends.kv.stream import DocumentStreamer, check_threads
from envs.base import KnobgymEnv, LatencyReference
from envs.budget import Budget, KVBudget, check_budget_ms, device_kv_budget
from envs.kv_data import default_documents, episode_ids, episode_windows, split_stream_prefix, stream_prefix
from envs.kv_grid import kv_action_grid
from envs.kv_memo import PrefixMemo
from envs.kv_schedule import simulate_cache, simulate_schedule
from envs.kv_scoring import ChunkRecord, episode_summary, play_chunk
from envs.latency import TpotLatency, check_latency_mode
from envs.reward import RewardConfig, compute_reward
from latency_model.tpot import TpotEstimator, TpotSettings, get_tpot_estimator

OBSERVATION_NAMES = ("chunk_mean_nll", "chunk_max_nll", "chunk_std_nll", "episode_mean_nll", "cache_length",
                     "tokens_since_prune", "budget_ms", "tpot_over_budget", "progress", "kv_cap_tokens")
MAX_OBSERVED_NLL = 50.0  # NLL features are clipped here (nats); a uniform guess over 2^21 tokens is ~14.6
MAX_TPOT_OVER_BUDGET = 100.0


class StreamingKVEnv(KnobgymEnv):
    """Stream a document under per-chunk KV policy knobs (see the module docstring).

    Args:
        policy: registered policy name or class (default ``"SinkWindow"``).
        budget: a KV budget form (:func:`envs.budget.device_kv_budget`): TPOT budget, optionally ``+``
            a KV cap (``"20ms"``, ``"[15ms,25ms]"``, ``"20ms+256tok"``, ``"20ms+4MB"``), the TPOT part
            also relative to this device (``"auto"``, ``"50%"``, ``"[25%,75%]+256tok"``); ``None`` or
            ``"auto"`` = the suggested binding TPOT budget of this device.
        chunk_tokens: tokens decoded per step.
        episode_tokens: tokens predicted per episode.
        split: the split episodes are drawn from when ``reset`` names none (default ``train``).
        knob_grid: per-knob values offered by the action space (see :func:`kv_action_grid`).
        latency: ``"estimated"`` (default, deterministic) or ``"measured"``.
        tpot_model: the estimated-mode TPOT estimator (a :class:`TpotEstimator` or a dict of its
            coefficients ``base_ms``, ``per_slot_ms``, ``per_prune_ms``); ``None`` = the model's
            cached estimator on this device (profiled once when missing).
        threads: torch intra-op threads while streaming (default 1; see :mod:`backends.kv.stream`).
        model_path: checkpoint folder of a causal LM; ``None`` = the tiny reference model.
        model_spec: instead of ``model_path``, the HF backend's model keys (``model``, ``precision``,
            ``device``, ``quantization``, ...; :func:`backends.kv.sources.load_kv_model`).
        dataset, text_column: the user's documents through HF ``datasets`` (a text file, a JSON-lines
            file or a ``save_to_disk`` folder, and the column holding the text; default ``text``;
            :func:`backends.kv.sources.read_text_documents`); ``None`` = the held-out documents.
        storage: KV cache storage, ``"slots"`` (default) or ``"concat"`` (:mod:`backends.kv.cache`).
        model, documents: an already loaded causal LM and its token-id documents (tests, custom
            data); with a custom ``model`` the ``documents`` are required.
        reward_config: coefficients of the shared reward.
    """

    #: CLI-sized episodes (knobgym_cli.group_configs): 128 tokens in 16 chunks of 8 (``gym.make``
    #: defaults to 512 in chunks of 32), so an episode costs about a quarter of the default's model
    #: time and a training run with the baselines fits in minutes on a CPU; pass
    #: ``env.kwargs.episode_tokens=512 env.kwargs.chunk_tokens=32`` for the full episodes
    cli_kwargs = {"chunk_tokens": 8, "episode_tokens": 128, "latency": "estimated",
                  "reward_config": {"overshoot_penalty": 1.0, "violation_penalty": 0.5}}

    def __init__(self, policy: Any = "SinkWindow", budget: Any = None, chunk_tokens: int = 32,
                 episode_tokens: int = 512, split: str = "train", knob_grid: dict | None = None,
                 latency: str = "estimated", tpot_model: TpotEstimator | dict | None = None, threads: int | None = 1,
                 model_path: str | None = None, model=None, documents=None,
                 reward_config: RewardConfig | dict | None = None, model_spec: dict | str | None = None,
                 dataset: str | None = None, text_column: str = "text", storage: str = DEFAULT_STORAGE):
        super().__init__()
        self.policy_class = kv_policy_class(policy) if isinstance(policy, str) else policy
        if not (isinstance(self.policy_class, type) and issubclass(self.policy_class, KVPolicy)):
            raise ValueError(f"policy={policy!r} is invalid; accepted: a registered KV policy name or class")
        if self.policy_class is FullCache:
            raise ValueError("policy='FullCache' is invalid for an env (it has no knobs); accepted: "
                             f"{', '.join(n for n in registered_kv_policies() if n != 'FullCache')}")
        self.chunk_tokens = check_int("chunk_tokens", chunk_tokens, 1)
        self.episode_tokens = check_int("episode_tokens", episode_tokens, 1)
        check_latency_mode(latency)  # before the model loads; self.latency is made once it has
        device_kv_budget(budget)  # checked before the model loads; a device-relative one is resolved below
        self.split = check_split(split)
        self.threads = check_threads(threads)
        self.reward_config = (RewardConfig(**reward_config) if isinstance(reward_config, dict)
                              else reward_config or RewardConfig())
        self.knob_grid = kv_action_grid(self.policy_class, knob_grid)
        self.knob_names = list(self.knob_grid)
        self.action_space = spaces.MultiDiscrete([len(v) for v in self.knob_grid.values()])

        if storage not in STORAGES:
            raise ValueError(f"storage={storage!r} is invalid; accepted: {', '.join(STORAGES)}")
        self.storage = storage
        self.model, self.documents, self.stream_prefix = self._model_and_documents(
            model, documents, model_path, model_spec, dataset, text_column)
        self.windows = episode_windows(self.documents, episode_tokens, len(self.stream_prefix))
        if not self.windows[split]:
            raise ValueError(f"no {split} episode of episode_tokens+1={episode_tokens + 1} tokens in the documents "
                             f"(split sizes {self.split_sizes()}); accepted: longer documents or a smaller "
                             "episode_tokens")
        self.vocab_size = self.model.config.get_text_config(decoder=True).vocab_size
        self.bytes_per_token = kv_bytes_per_token(self.model)
        self.latency = TpotLatency(latency, tpot_model, default=lambda: get_tpot_estimator(
            self.model, settings=TpotSettings(threads=self.threads)))
        self._chunk_tpot, self._smallest_peak = self._simulate_grid()
        self._reference = self._grid_reference()
        self.kv_budget = self._resolve_budget(budget)
        self.budget = self.kv_budget.tpot  # envs.protocols.GroupEnv: the TPOT budget agents draw from
        self._warn_if_budget_unreachable(self.kv_budget)
        self.trajectory_nvec = tuple(int(n) for n in self.action_space.nvec) * self.episode_steps
        h = len(self.knob_names)
        self.stage_heads = tuple(tuple(range(c * h, (c + 1) * h)) for c in range(self.episode_steps))
        self._prefixes = PrefixMemo()
        self._latency_memo: dict[tuple, float] = {}
        self._grid_policies = [self.policy_class(**dict(zip(self.knob_names, combination)))
                               for combination in itertools.product(*self.knob_grid.values())]

        high = np.array([MAX_OBSERVED_NLL] * 4 + [episode_tokens + 1] * 2
                        + [10.0 * self.kv_budget.tpot.high_ms, MAX_TPOT_OVER_BUDGET, 1.0, episode_tokens + 1],
                        dtype=np.float32)
        self.observation_space = spaces.Box(low=np.zeros_like(high), high=high, dtype=np.float32)
        self._streamer: DocumentStreamer | None = None

    @classmethod
    def check_options(cls, kwargs: dict) -> None:
        """The cheap checks of the options that name files (``model_path``, ``model_spec``, ``dataset``,
        ``text_column``; nothing loaded), the same the constructor makes before loading: a command runs
        them first (:func:`knobgym_cli.build.check_run_backend`), so a missing folder is one line."""
        check_kv_sources(kwargs.get("model_path"), kwargs.get("model_spec"), kwargs.get("dataset"),
                         kwargs.get("text_column", "text"))

    @staticmethod
    def _model_and_documents(model, documents, model_path, model_spec, dataset,
                             text_column) -> tuple[Any, list[list[int]], list[int]]:
        """The model, the token-id documents and the stream prefix (:mod:`envs.kv_data`): given (no
        prefix: the documents stream as they are), or loaded (the dataset read before the model)."""
        prefix: list[int] = []
        if model is None:
            texts = read_text_documents(dataset, text_column) if dataset is not None else None
            model, tokenizer = load_kv_model(model_path, model_spec)
            if documents is None:
                documents = tokenize_documents(tokenizer, texts) if texts is not None else default_documents(tokenizer)
                prefix = stream_prefix(tokenizer)
                documents = split_stream_prefix(documents, prefix)
        elif dataset is not None or model_spec is not None:
            raise ValueError("dataset / model_spec were given with a loaded model; accepted: model and documents, "
                             "or model_path / model_spec and optionally dataset")
        elif documents is None:
            raise ValueError("documents=None with a custom model; accepted: a list of token-id sequences")
        return model, [list(map(int, doc)) for doc in documents], prefix

    # --- latency ----------------------------------------------------------------------------
    @property
    def tpot_model(self) -> TpotEstimator:
        """The TPOT estimator (``self.latency.estimator``)."""
        return self.latency.estimator

    def _simulate_grid(self) -> tuple[np.ndarray, int]:
        """Estimated TPOT ``[configurations, chunks]`` of every grid configuration held for a whole
        episode, and the smallest peak cache (tokens) of any configuration."""
        rows, peaks = [], []
        for combination in itertools.product(*self.knob_grid.values()):
            attended, pruned = simulate_cache(self.policy_class(**dict(zip(self.knob_names, combination))),
                                              self.episode_tokens)
            per_step = self.latency.schedule_ms(pruned, attended)
            rows.append([chunk.mean() for chunk in np.array_split(per_step, self.episode_steps)])
            peaks.append(int(attended.max()))
        return np.asarray(rows), min(peaks)

    @property
    def episode_steps(self) -> int:
        """Decisions (chunks) per episode."""
        return math.ceil(self.episode_tokens / self.chunk_tokens)

    def _grid_reference(self) -> LatencyReference:
        """Per chunk, the estimated TPOT of the cheapest and of the most expensive grid configuration
        (each held for a whole episode): the references of the achievable range and the suggested budget."""
        means = self._chunk_tpot.mean(axis=1)
        return LatencyReference(self._chunk_tpot[np.argmin(means)], self._chunk_tpot[np.argmax(means)])

    def _reference_latencies(self) -> LatencyReference:
        return self._reference

    def _time_budget(self, budget: KVBudget) -> Budget:
        return budget.tpot

    def _budget_problems(self, budget: KVBudget) -> list[str]:
        cap = budget.cap_tokens(self.bytes_per_token)
        if cap is not None and cap < self._smallest_peak:
            return [f"KV cap {cap} tokens is below the smallest peak cache of any configuration "
                    f"({self._smallest_peak} tokens): every chunk after the cache fills violates it"]
        return []

    def _warning_identity(self) -> str:
        return str((self.policy_class.policy_name(), self.tpot_model.coefficients, self.episode_tokens))

    # --- knobs ------------------------------------------------------------------------------
    def _action_help(self) -> str:
        return f"integers in [0, n) for n in {self.action_space.nvec.tolist()} ({', '.join(self.knob_names)})"

    def policy_for(self, action) -> KVPolicy:
        """The policy an action selects; a ``ValueError`` naming the action and the space otherwise."""
        ints = self.check_action(action)
        return self.policy_class(**{name: values[int(i)] for (name, values), i in zip(self.knob_grid.items(), ints)})

    # --- episodes ---------------------------------------------------------------------------
    def split_sizes(self) -> dict[str, int]:
        return {split: len(windows) for split, windows in self.windows.items()}

    def num_samples(self, split: str | None = None) -> int:
        """Episodes (document windows) in ``split`` (default: the env's split); ``sample_id`` ranges over them."""
        return len(self.windows[check_split(self.split if split is None else split)])

    def _resolve_budget(self, value: Any) -> KVBudget:
        """``value`` in any KV budget form, its device-relative TPOT part resolved against this env's
        achievable TPOT range; the suggested budget is written to 6 significant digits, so the budget
        a run records (``str``) reads back as the same one."""
        return device_kv_budget(value, self.achievable_range_ms, float(f"{self.suggested_budget_ms:.6g}"))

    def _episode_budget(self, value: Any) -> KVBudget:
        """A budget given at reset or to a group (``auto`` and fractions too): a form without a KV cap
        keeps the env's cap and is not warned about (as on the knob envs: agents draw episode budgets
        around the env's range on purpose, ``budget_jitter``, and every drawn value would warn); a
        cap other than the env's (warned about when the env was made) is warned about once when it
        cannot be met."""
        parsed = self._resolve_budget(value)
        if not parsed.has_cap:
            return self.kv_budget.with_tpot(parsed.tpot)
        if parsed.cap_tokens(self.bytes_per_token) != self.kv_budget.cap_tokens(self.bytes_per_token):
            self._warn_if_budget_unreachable(parsed)
        return parsed

    def _new_streamer(self, split: str, sample_id: int) -> DocumentStreamer:
        doc_index, start = self.windows[split][sample_id]
        return DocumentStreamer(self.model, episode_ids(self.documents[doc_index], start, self.episode_tokens,
                                                        self.stream_prefix),
                                threads=self.threads, storage=self.storage)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode: ``options`` may fix ``sample_id`` (a window of ``split``), ``split`` and ``budget``.

        A ``budget`` option without a KV cap (e.g. a number of ms, as agents pass) keeps the env's
        cap. Options are validated first (:meth:`envs.base.KnobgymEnv.begin_episode`): a reset that
        raises leaves the episode in progress untouched.
        """
        start = self.begin_episode(seed, options, default_budget=self.kv_budget)
        split, sample_id = start.split, start.sample_id
        doc_index, begin = self.windows[split][sample_id]
        self._budget_ms = start.budget_ms
        self._cap_tokens = start.budget.cap_tokens(self.bytes_per_token)
        self._streamer = self._new_streamer(split, sample_id)
        self._episode_nll: list[float] = []
        self._chunk_infos: list[dict] = []
        self._last_nll = np.zeros(1)
        self._last_tpot = 0.0
        info = {"split": split, "sample_id": sample_id, "document": doc_index, "start": begin,
                "budget_ms": self._budget_ms, "kv_cap_tokens": self._cap_tokens, "episode_steps": self.episode_steps,
                "tpot_noise_pct": self.tpot_model.noise_pct}
        return self._observation(), info

    def step(self, action):
        if self._streamer is None:
            raise ValueError("step() called before reset(); accepted: call reset() first")
        if self._streamer.remaining == 0:
            raise ValueError("step() called after the episode ended; accepted: call reset() first")
        arr = np.asarray(action)
        if arr.ndim == 1 and len(arr) == len(self.trajectory_nvec) != len(self.knob_names):
            action = self.to_env_action(arr, len(self._chunk_infos))  # a whole trajectory: this chunk's slice
        policy = self.policy_for(action)
        record = self._play_chunk(self._streamer, policy)
        reward, info = self._score_chunk(record, policy, self._budget_ms, self._cap_tokens)
        self._episode_nll.extend(record.nll.tolist())
        self._last_nll, self._last_tpot = record.nll, info["tpot_ms"]
        self._chunk_infos.append(info)
        terminated = self._streamer.remaining == 0
        if terminated:
            info.update(episode_summary(self._chunk_infos))
        return self._observation(), reward, terminated, False, info

    def evaluate_chunk_group(self, actions: Sequence) -> tuple[np.ndarray, list[dict]]:
        """Rewards and infos of each action for the NEXT chunk, from the current state, without advancing.

        Every action starts from the same stream prefix (a fork of the current cache), as if each
        were the step taken now: what a per-chunk group needs. Deterministic in estimated mode.
        """
        if self._streamer is None or self._streamer.remaining == 0:
            raise ValueError("evaluate_chunk_group() needs a running episode; accepted: call reset() first")
        policies = [self.policy_for(a) for a in actions]
        results = [self._score_chunk(self._play_chunk(self._streamer.fork(), policy), policy, self._budget_ms,
                                     self._cap_tokens) for policy in policies]
        return np.array([r for r, _ in results], dtype=np.float64), [info for _, info in results]

    def evaluate_episode_group(self, sample_id: int, budget: Any, action_sequences: Sequence,
                               split: str | None = None) -> tuple[np.ndarray, list[list[dict]]]:
        """Returns (sum of chunk rewards) and per-chunk infos of whole-episode action sequences on one episode.

        Each sequence (``episode_steps`` actions) is scored as if it were its own episode started with
        ``reset(options={"sample_id": sample_id, "split": split, "budget": budget})`` (the last
        chunk's info carries the episode summary, as ``step`` gives it); sequences that share their
        first chunks share the streaming of those chunks. In estimated mode chunk outcomes are
        memoised per (episode, decision prefix), so a sequence scored before (at any budget) costs
        no model run. ``budget`` must have one fixed TPOT value; without a cap it keeps the env's.
        The env's own episode is not touched.
        """
        split = check_split(self.split if split is None else split)
        sample_id = self.check_sample_id(sample_id, split)
        parsed = self._episode_budget(budget)
        if parsed.tpot.is_range:
            raise ValueError(f"budget={budget!r} is invalid for a group; accepted: one fixed TPOT budget")
        sequences = [list(sequence) for sequence in action_sequences]
        bad = [i for i, sequence in enumerate(sequences) if len(sequence) != self.episode_steps]
        if bad:
            raise ValueError(f"action sequence {bad[0]} has {len(sequences[bad[0]])} actions; accepted: "
                             f"episode_steps={self.episode_steps} actions per sequence")
        policies = [[self.policy_for(action) for action in sequence] for sequence in sequences]
        budget_ms, cap = float(parsed.tpot.low_ms), parsed.cap_tokens(self.bytes_per_token)
        returns, infos = np.zeros(len(sequences)), [[] for _ in sequences]
        if self.latency.mode == "estimated":
            for i, sequence in enumerate(policies):
                for policy, record in zip(sequence, self._records(split, sample_id, sequence)):
                    reward, info = self._score_chunk(record, policy, budget_ms, cap)
                    returns[i] += reward
                    infos[i].append(info)
        else:  # measured: fresh timings every time, prefixes shared within this group only
            def play(streamer: DocumentStreamer, depth: int, members: list[int]) -> None:
                if depth == self.episode_steps:
                    return
                branches: dict[KVPolicy, list[int]] = {}
                for i in members:
                    branches.setdefault(policies[i][depth], []).append(i)
                for n, (policy, group) in enumerate(branches.items()):
                    branch = streamer if n == len(branches) - 1 else streamer.fork()
                    reward, info = self._score_chunk(self._play_chunk(branch, policy), policy, budget_ms, cap)
                    for i in group:
                        returns[i] += reward
                        infos[i].append(dict(info))
                    play(branch, depth + 1, group)

            play(self._new_streamer(split, sample_id), 0, list(range(len(sequences))))
        for chunk_infos in infos:
            chunk_infos[-1].update(episode_summary(chunk_infos))
        return returns, infos

    # --- decision prefixes (estimated mode: memoised, shared between groups and queries) -------
    def _records(self, split: str, sample_id: int, policies: Sequence[KVPolicy]) -> list[ChunkRecord]:
        """The chunk records of an episode whose first chunks ran under ``policies``: through the
        prefix memo in estimated mode (:class:`envs.kv_memo.PrefixMemo`), streamed afresh in measured mode."""
        if self.latency.mode != "estimated":
            streamer = self._new_streamer(split, sample_id)
            return [self._play_chunk(streamer, policy) for policy in policies]
        return self._prefixes.records(split, sample_id, policies, self._new_streamer, self._play_chunk)

    # --- envs.protocols.GroupEnv --------------------------------------------------------------
    def to_env_action(self, trajectory: Sequence[int], stage: int) -> np.ndarray:
        """The action of chunk ``stage``: elements ``stage*H .. (stage+1)*H - 1`` of the trajectory."""
        h = len(self.knob_names)
        return np.asarray(trajectory, dtype=np.int64)[stage * h:(stage + 1) * h]

    def _trajectory_codes(self, trajectory: Sequence[int], stages: int) -> tuple[int, ...]:
        """Per chunk, the flat grid index of the setting ``trajectory`` picks (checked once, vectorised)."""
        arr = np.asarray(trajectory)
        nvec = np.asarray(self.trajectory_nvec)
        if arr.shape != nvec.shape or arr.dtype.kind not in "iu" or np.any(arr < 0) or np.any(arr >= nvec):
            raise ValueError(f"trajectory {arr.tolist()!r} is invalid; accepted: {len(nvec)} integers "
                             f"(episode_steps={self.episode_steps} x knobs {', '.join(self.knob_names)}), element i "
                             f"in [0, {self.action_space.nvec.tolist()}[i % {len(self.knob_names)}])")
        rows = arr.reshape(self.episode_steps, len(self.knob_names))[:stages]
        return tuple(int(c) for c in np.ravel_multi_index(rows.T, self.action_space.nvec))

    def _trajectory_policies(self, trajectory: Sequence[int], stages: int) -> list[KVPolicy]:
        return [self._grid_policies[c] for c in self._trajectory_codes(trajectory, stages)]

    def stage_observation(self, sample_id: int, budget_ms: float, split: str, stage: int,
                          trajectory: Sequence[int] | None = None) -> np.ndarray:
        """The observation before chunk ``stage`` of an episode whose earlier chunks followed ``trajectory``.

        Replays the earlier chunks' decisions through the prefix memo (no env state changes).
        """
        sample_id = self.check_sample_id(sample_id, split)
        stage = check_int("stage", stage, 0, self.episode_steps)
        if stage > 0 and trajectory is None:
            raise ValueError(f"stage={stage} needs the trajectory of the earlier chunks; accepted: a vector of "
                             f"{len(self.trajectory_nvec)} elements")
        budget_ms = check_budget_ms(budget_ms)
        records = self._records(split, sample_id, self._trajectory_policies(trajectory, stage)) if stage else []
        cap = self.kv_budget.cap_tokens(self.bytes_per_token)
        if not records:
            return self._observation_of(np.zeros(1), 0.0, 0, 0, budget_ms, 0.0, 0, cap)
        last = records[-1]
        return self._observation_of(last.nll, float(np.mean(np.concatenate([r.nll for r in records]))),
                                    last.end_cache_length, last.end_since_prune, budget_ms, self._tpot_of(last),
                                    sum(r.num_tokens for r in records), cap)

    def evaluate_group(self, sample_id: int, budget_ms: float, trajectories: Sequence[Sequence[int]],
                       split: str) -> tuple[np.ndarray, list[dict]]:
        """Episode returns and last-step infos (with the episode summary) of whole-episode trajectories
        at one TPOT budget and the env's KV cap (see :meth:`evaluate_episode_group`)."""
        sequences = [[self.to_env_action(t, c) for c in range(self.episode_steps)]
                     for t in (np.asarray(t, dtype=np.int64) for t in trajectories)]
        returns, infos = self.evaluate_episode_group(sample_id, self.kv_budget.with_tpot(check_budget_ms(budget_ms)),
                                                     sequences, split)
        return returns, [dict(chunk_infos[-1], reward=float(r)) for r, chunk_infos in zip(returns, infos)]

    def estimated_latency_ms(self, sample_id: int, trajectories: Sequence[Sequence[int]], split: str) -> np.ndarray:
        """Mean estimated TPOT (ms per token) of each trajectory: the cache schedule its per-chunk
        policies give (:func:`simulate_schedule`, no model run) through the TPOT estimator; the same
        per-token figure the reward compares with the budget. The schedule does not depend on the
        document, so ``sample_id`` and ``split`` are only checked."""
        self.check_sample_id(sample_id, split)
        out = np.zeros(len(trajectories))
        for i, trajectory in enumerate(trajectories):
            codes = self._trajectory_codes(trajectory, self.episode_steps)
            if codes not in self._latency_memo:
                policies = [self._grid_policies[c] for c in codes]
                attended, pruned = simulate_schedule(policies, self.chunk_tokens, self.episode_tokens)
                self._latency_memo[codes] = float(np.mean(self.latency.schedule_ms(pruned, attended)))
            out[i] = self._latency_memo[codes]
        return out

    def provenance(self) -> dict:
        """The model, the latency source and the knob grid, for run records."""
        return {"model": {"class": type(self.model).__name__,
                          "name_or_path": str(getattr(self.model.config, "_name_or_path", "") or "")},
                "latency": self.latency.mode, "estimator": self.latency.estimator_record(),
                "knob_space": {"policy": self.policy_class.policy_name(),
                               "grid": {k: list(v) for k, v in self.knob_grid.items()},
                               "chunk_tokens": self.chunk_tokens, "episode_tokens": self.episode_tokens}}

    # --- one chunk -----------------------------------------------------------------------------
    def _play_chunk(self, streamer: DocumentStreamer, policy: KVPolicy) -> ChunkRecord:
        return play_chunk(streamer, policy, self.chunk_tokens)

    def _tpot_of(self, record: ChunkRecord) -> float:
        return self.latency.chunk_ms(record.prune_steps, record.cache_length, record.step_ms)

    def _score_chunk(self, record: "ChunkRecord", policy: KVPolicy, budget_ms: float, cap_tokens: int | None):
        """Reward and info of one chunk record at a budget (no model run)."""
        tpot_ms = self._tpot_of(record)
        mean_nll = float(record.nll.mean())
        score = float(np.clip(1.0 - mean_nll / math.log(self.vocab_size), 0.0, 1.0))
        reward, tpot_violated = compute_reward(score, tpot_ms, budget_ms, self.reward_config)
        peak = int(record.cache_length.max())
        kv_violated = False
        if cap_tokens is not None:
            penalty, kv_violated = compute_reward(0.0, peak / cap_tokens, 1.0, self.reward_config)
            reward += penalty
        # Wall-clock figures appear in info only in measured mode, so estimated mode stays deterministic.
        info = {
            "policy": str(policy), "knobs": policy.knobs(), "nll": record.nll.copy(), "mean_nll": mean_nll,
            "score": score, "tpot_ms": tpot_ms, "latency_mode": self.latency.mode, "budget_ms": budget_ms,
            "violated": bool(tpot_violated or kv_violated), "tpot_violated": tpot_violated,
            "kv_violated": kv_violated, "kv_cap_tokens": cap_tokens, "peak_kv_tokens": peak,
            "peak_kv_bytes": peak * self.bytes_per_token, "cache_length": record.cache_length.copy(),
            "prune_events": [dict(e) for e in record.prune_events], "chunk_reward": float(reward),
        }
        if self.latency.mode == "measured":
            info["step_ms"] = record.step_ms.copy()
        return float(reward), info

    def _observation(self) -> np.ndarray:
        cache = self._streamer.cache
        episode = float(np.mean(self._episode_nll)) if self._episode_nll else 0.0
        return self._observation_of(self._last_nll, episode, cache.cache_length, cache.tokens_since_prune,
                                    self._budget_ms, self._last_tpot, self._streamer.cursor, self._cap_tokens)

    def _observation_of(self, last_nll: np.ndarray, episode_nll: float, cache_length: int, since_prune: int,
                        budget_ms: float, last_tpot: float, cursor: int, cap_tokens: int | None) -> np.ndarray:
        nll_stats = np.clip([last_nll.mean(), last_nll.max(), last_nll.std(), episode_nll], 0.0, MAX_OBSERVED_NLL)
        cap = min(cap_tokens or 0, self.episode_tokens + 1)
        values = np.array([*nll_stats, cache_length, since_prune, budget_ms, last_tpot / budget_ms,
                           cursor / self.episode_tokens, cap], dtype=np.float32)
        return self.clip_observation(values, low=self.observation_space.low, high=self.observation_space.high)
