"""StreamingKV-v0 and KV-<Policy>-v0: pick KV-cache policy knobs chunk by chunk while streaming a document.

An episode streams one document window of ``episode_tokens`` tokens through a causal LM token by
token (teacher forcing). Each step decodes the next ``chunk_tokens`` tokens under the policy knobs
the action picks.

Episodes (a fixed document stream): the documents are cut into consecutive, non-overlapping
windows of ``episode_tokens + 1`` tokens, numbered in document order; window ``i`` belongs to
``validation`` if ``i % 5 == 3``, to ``test`` if ``i % 5 == 4``, else to ``train``. ``sample_id``
is the window's index within its split (:meth:`StreamingKVEnv.num_samples` per split).

Action: ``MultiDiscrete``, one entry per knob of the env's action grid (:func:`kv_action_grid`:
field name -> the values offered; the grid lives here, with the env, not on the policy class),
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

Budget: ``budget=None`` (default) uses :attr:`StreamingKVEnv.suggested_budget_ms`, a TPOT budget
that binds on this device. A fixed budget outside the achievable TPOT range is warned about once,
with the range and the suggestion.

Groups (:class:`envs.protocols.GroupEnv`, what GRPO and the baselines use; deterministic in
estimated mode): an episode of ``C = episode_steps`` chunks with ``H`` knobs is ``C`` stages over
a trajectory vector of ``C * H`` elements, stage ``c`` reading elements ``c*H .. (c+1)*H - 1``
(``to_env_action``). ``stage_observation`` replays the earlier chunks' decisions of a trajectory;
``evaluate_group`` scores whole-episode trajectories (the return, i.e. the sum of chunk rewards,
and the last step's info); ``estimated_latency_ms`` is the mean TPOT per token of a trajectory
from its simulated cache schedule (:func:`simulate_schedule`, no model run), the figure the
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

Env ids: :func:`register_kv_envs` registers ``StreamingKV-v0`` (the StreamingLLM policy,
:class:`~backends.kv.policies.SinkWindow`) and ``KV-<Policy>-v0`` for every registered policy
(``import envs`` calls it; call it again after registering a policy later).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections import OrderedDict
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from backends.kv.cache import kv_bytes_per_token
from backends.kv.policies import FullCache, KVPolicy, kv_policy_class, registered_kv_policies
from backends.kv.cache import DEFAULT_STORAGE, STORAGES
from backends.kv.sources import load_kv_model, read_text_documents, tokenize_documents
from backends.kv.stream import DocumentStreamer, check_threads
from backends.tiny_text import held_out_token_documents
from envs.budget import KVBudget, check_budget_ms
from envs.registry import register_env
from envs.reward import RewardConfig, compute_reward
from latency_model.modes import LATENCY_MODES
from latency_model.tpot import TpotEstimator, TpotSettings, get_tpot_estimator

OBSERVATION_NAMES = ("chunk_mean_nll", "chunk_max_nll", "chunk_std_nll", "episode_mean_nll", "cache_length",
                     "tokens_since_prune", "budget_ms", "tpot_over_budget", "progress", "kv_cap_tokens")
STREAMING_KV_ID = "StreamingKV-v0"
MAX_OBSERVED_NLL = 50.0  # NLL features are clipped here (nats); a uniform guess over 2^21 tokens is ~14.6
MAX_TPOT_OVER_BUDGET = 100.0
SPLIT_OF_WINDOW = ("train", "train", "train", "validation", "test")  # window i -> SPLIT_OF_WINDOW[i % 5]
RESET_OPTIONS = ("sample_id", "budget", "split")
MAX_MEMO_CHUNKS = 200_000  # chunk records kept per env (estimated mode); cleared beyond
MAX_SNAPSHOTS = 256  # forked stream states kept (least recently used dropped)

# --- action grids: which values each knob takes in an env --------------------------------------
DEFAULT_KNOB_GRID: dict[str, tuple] = {"window": (32, 64, 128, 256), "compress_every": (1, 8, 32, 64)}
ACTION_GRIDS: dict[str, dict[str, tuple]] = {
    "SinkWindow": {"n_sink": (0, 4, 8), "window": (32, 64, 128, 256), "compress_every": (1, 8, 32, 64)},
    "KeyNormWindow": {"window": (32, 64, 128, 256), "n_recent": (8, 32), "compress_every": (1, 8, 32, 64)},
}
_WARNED: set = set()


def kv_action_grid(policy_class: type[KVPolicy], knob_grid: dict | None = None) -> dict[str, tuple]:
    """The action grid of ``policy_class``: knob name -> values, every combination a valid policy.

    Per knob, first match wins: ``knob_grid``, :data:`ACTION_GRIDS` of the policy,
    :data:`DEFAULT_KNOB_GRID` (``window`` and ``compress_every``), else the field's default alone
    (the knob is then fixed). Order (the action's element order): the policy's grid's
    (:data:`ACTION_GRIDS`, else :data:`DEFAULT_KNOB_GRID`), then field order, whatever the order
    of ``knob_grid``'s keys (so a grid read back from a saved config gives the same layout).
    """
    given = dict(knob_grid or {})
    # An option that is not a knob (metadata knob=False, e.g. rope_positions) joins the grid only when named.
    fields = [f for f in dataclasses.fields(policy_class) if f.init and (f.metadata.get("knob", True) or f.name in given)]
    names = [f.name for f in fields]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"knob_grid names unknown knob(s) {unknown} of {policy_class.__name__}; accepted: {names}")
    base = dict(ACTION_GRIDS.get(policy_class.policy_name(), {}))
    base.update({name: values for name, values in DEFAULT_KNOB_GRID.items() if name not in base})
    # The order never follows ``knob_grid``'s own: a grid that went through a config file (keys
    # sorted) must give the same action layout as the one the run was trained with.
    order = [n for n in base if n in names] + [n for n in names if n not in base]
    grid = {}
    for field in fields:
        values = given.get(field.name, base.get(field.name))
        if values is None:
            if field.default is dataclasses.MISSING:
                raise ValueError(f"{policy_class.__name__}.{field.name} has no default and no grid; accepted: "
                                 f"knob_grid={{'{field.name}': (values, ...)}}")
            values = (field.default,)
        values = tuple(values)
        if not values:
            raise ValueError(f"knob_grid[{field.name!r}] is empty; accepted: at least one value")
        grid[field.name] = values
    grid = {name: grid[name] for name in order}
    for combination in itertools.product(*grid.values()):
        try:
            policy_class(**dict(zip(grid, combination)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"the action grid of {policy_class.__name__} contains an invalid combination "
                             f"{dict(zip(grid, combination))}: {error}") from None
    return grid


def episode_windows(documents: Sequence[Sequence[int]], episode_tokens: int) -> dict[str, list[tuple[int, int]]]:
    """``split -> [(document index, start)]``: the fixed episode stream (see module docstring)."""
    windows: dict[str, list[tuple[int, int]]] = {"train": [], "validation": [], "test": []}
    index = 0
    for doc_index, document in enumerate(documents):
        for start in range(0, len(document) - episode_tokens, episode_tokens + 1):
            windows[SPLIT_OF_WINDOW[index % len(SPLIT_OF_WINDOW)]].append((doc_index, start))
            index += 1
    return windows


def simulate_cache(policy: KVPolicy, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(attended, pruned)`` per step of ``policy`` over ``tokens`` fed tokens, without running a model.

    Exact for the base schedule (:meth:`KVPolicy.should_prune`: grow to ``window + compress_every``,
    cut back to ``window``).
    """
    return simulate_schedule([policy], max(1, tokens), tokens)


class StreamingKVEnv(gym.Env):
    """Stream a document under per-chunk KV policy knobs (see the module docstring).

    Args:
        policy: registered policy name or class (default ``"SinkWindow"``).
        budget: a :class:`~envs.budget.KVBudget` form: TPOT budget, optionally ``+`` a KV cap
            (``"20ms"``, ``"[15ms,25ms]"``, ``"20ms+256tok"``, ``"20ms+4MB"``); ``None`` = the
            suggested binding TPOT budget of this device.
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

    metadata = {"render_modes": []}

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
        for name, value in (("chunk_tokens", chunk_tokens), ("episode_tokens", episode_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; accepted: an integer >= 1")
        if latency not in LATENCY_MODES:
            raise ValueError(f"latency={latency!r} is invalid; accepted: {', '.join(LATENCY_MODES)}")
        if split not in SPLIT_OF_WINDOW:
            raise ValueError(f"split={split!r} is invalid; accepted: train, validation, test")
        self.chunk_tokens, self.episode_tokens, self.latency, self.split = chunk_tokens, episode_tokens, latency, split
        self.threads = check_threads(threads)
        self.reward_config = (RewardConfig(**reward_config) if isinstance(reward_config, dict)
                              else reward_config or RewardConfig())
        self.knob_grid = kv_action_grid(self.policy_class, knob_grid)
        self.knob_names = list(self.knob_grid)
        self.action_space = spaces.MultiDiscrete([len(v) for v in self.knob_grid.values()])

        if storage not in STORAGES:
            raise ValueError(f"storage={storage!r} is invalid; accepted: {', '.join(STORAGES)}")
        self.storage = storage
        if model is None:
            texts = read_text_documents(dataset, text_column) if dataset is not None else None  # before the model
            model, tokenizer = load_kv_model(model_path, model_spec)
            if documents is None:
                documents = (tokenize_documents(tokenizer, texts) if texts is not None
                             else list(held_out_token_documents(tokenizer).values()))
        elif dataset is not None or model_spec is not None:
            raise ValueError("dataset / model_spec were given with a loaded model; accepted: model and documents, "
                             "or model_path / model_spec and optionally dataset")
        elif documents is None:
            raise ValueError("documents=None with a custom model; accepted: a list of token-id sequences")
        self.model = model
        self.documents = [list(map(int, doc)) for doc in documents]
        self.windows = episode_windows(self.documents, episode_tokens)
        if not self.windows[split]:
            raise ValueError(f"no {split} episode of episode_tokens+1={episode_tokens + 1} tokens in the documents "
                             f"(split sizes {self.split_sizes()}); accepted: longer documents or a smaller "
                             "episode_tokens")
        self.vocab_size = model.config.get_text_config(decoder=True).vocab_size
        self.bytes_per_token = kv_bytes_per_token(model)
        self.tpot_model = self._tpot_estimator(tpot_model)
        self._chunk_tpot, self._smallest_peak = self._simulate_grid()
        self.kv_budget = (KVBudget.parse(budget) if budget is not None
                          else KVBudget.parse(f"{self.suggested_budget_ms:.6g}ms"))
        self.budget = self.kv_budget.tpot  # envs.protocols.GroupEnv: the TPOT budget agents draw from
        self._warn_if_budget_unreachable(self.kv_budget)
        self.trajectory_nvec = tuple(int(n) for n in self.action_space.nvec) * self.episode_steps
        h = len(self.knob_names)
        self.stage_heads = tuple(tuple(range(c * h, (c + 1) * h)) for c in range(self.episode_steps))
        self._memo: dict[tuple, ChunkRecord] = {}
        self._snapshots: OrderedDict[tuple, DocumentStreamer] = OrderedDict()
        self._latency_memo: dict[tuple, float] = {}
        self._grid_policies = [self.policy_class(**dict(zip(self.knob_names, combination)))
                               for combination in itertools.product(*self.knob_grid.values())]

        high = np.array([MAX_OBSERVED_NLL] * 4 + [episode_tokens + 1] * 2
                        + [10.0 * self.kv_budget.tpot.high_ms, MAX_TPOT_OVER_BUDGET, 1.0, episode_tokens + 1],
                        dtype=np.float32)
        self.observation_space = spaces.Box(low=np.zeros_like(high), high=high, dtype=np.float32)
        self._streamer: DocumentStreamer | None = None

    # --- latency ----------------------------------------------------------------------------
    def _tpot_estimator(self, given) -> TpotEstimator:
        if isinstance(given, dict):
            return TpotEstimator(**given)
        if isinstance(given, TpotEstimator):
            return given
        if given is not None:
            raise ValueError(f"tpot_model={given!r} is invalid; accepted: None, a TpotEstimator or a dict of its "
                             "coefficients (base_ms, per_slot_ms, per_prune_ms)")
        return get_tpot_estimator(self.model, settings=TpotSettings(threads=self.threads))

    def _simulate_grid(self) -> tuple[np.ndarray, int]:
        """Estimated TPOT ``[configurations, chunks]`` of every grid configuration held for a whole
        episode, and the smallest peak cache (tokens) of any configuration."""
        rows, peaks = [], []
        for combination in itertools.product(*self.knob_grid.values()):
            attended, pruned = simulate_cache(self.policy_class(**dict(zip(self.knob_names, combination))),
                                              self.episode_tokens)
            per_step = self.tpot_model.predict(pruned, attended)
            rows.append([chunk.mean() for chunk in np.array_split(per_step, self.episode_steps)])
            peaks.append(int(attended.max()))
        return np.asarray(rows), min(peaks)

    @property
    def episode_steps(self) -> int:
        """Decisions (chunks) per episode."""
        return math.ceil(self.episode_tokens / self.chunk_tokens)

    @property
    def achievable_range_ms(self) -> tuple[float, float]:
        """Estimated chunk TPOT of the cheapest and of the most expensive grid configuration (held all episode)."""
        means = self._chunk_tpot.mean(axis=1)
        return float(self._chunk_tpot[np.argmin(means)].min()), float(self._chunk_tpot[np.argmax(means)].max())

    @property
    def suggested_budget_ms(self) -> float:
        """A TPOT budget that binds on this device: the one the out-of-range warning names.

        Halfway between the cheapest configuration's 95th-percentile chunk TPOT and the most
        expensive configuration's median chunk TPOT (each held for a whole episode): the most
        expensive configuration misses it on a typical chunk, while the cheapest fits about 95%
        of chunks. When those leave no gap, halfway between the two medians.
        """
        means = self._chunk_tpot.mean(axis=1)
        cheap, costly = self._chunk_tpot[np.argmin(means)], self._chunk_tpot[np.argmax(means)]
        low, high = float(np.percentile(cheap, 95)), float(np.median(costly))
        if low >= high:
            low = float(np.median(cheap))
        return 0.5 * (low + high)

    def _warn_if_budget_unreachable(self, budget: KVBudget) -> None:
        lo, hi = self.achievable_range_ms
        key = (self.policy_class.policy_name(), str(self.tpot_model.coefficients), str(budget), self.episode_tokens)
        if key in _WARNED:
            return
        problems = []
        if budget.tpot.high_ms < lo:
            problems.append(f"TPOT budget {budget.tpot} is below the cheapest configuration's TPOT")
        elif budget.tpot.low_ms > hi:
            problems.append(f"TPOT budget {budget.tpot} is above the most expensive configuration's TPOT "
                            "(it never binds)")
        cap = budget.cap_tokens(self.bytes_per_token)
        if cap is not None and cap < self._smallest_peak:
            problems.append(f"KV cap {cap} tokens is below the smallest peak cache of any configuration "
                            f"({self._smallest_peak} tokens): every chunk after the cache fills violates it")
        if problems:
            _WARNED.add(key)
            warnings.warn(f"{'; '.join(problems)}: achievable TPOT on this device is {lo:.2f}ms..{hi:.2f}ms "
                          f"({self.tpot_model.describe()}); choose a budget inside it, e.g. "
                          f"budget={self.suggested_budget_ms:.3g}ms (one the most expensive configuration "
                          f"misses on a typical chunk)", stacklevel=3)

    # --- knobs ------------------------------------------------------------------------------
    def policy_for(self, action) -> KVPolicy:
        """The policy an action selects; a ``ValueError`` naming the action and the space otherwise."""
        arr = np.asarray(action)
        ok = arr.dtype.kind in "iu" or (arr.dtype.kind == "f" and bool(np.all(np.isfinite(arr)))
                                          and bool(np.all(arr == np.round(arr))))
        if ok:
            ints = arr.astype(np.int64)
            ok = ints.shape == self.action_space.shape and self.action_space.contains(ints)
        if not ok:
            raise ValueError(f"action {action!r} is outside the action space {self.action_space}; accepted: integers "
                             f"in [0, n) for n in {self.action_space.nvec.tolist()} ({', '.join(self.knob_names)})")
        return self.policy_class(**{name: values[int(i)] for (name, values), i in zip(self.knob_grid.items(), ints)})

    # --- episodes ---------------------------------------------------------------------------
    def split_sizes(self) -> dict[str, int]:
        return {split: len(windows) for split, windows in self.windows.items()}

    def num_samples(self, split: str | None = None) -> int:
        """Episodes (document windows) in ``split`` (default: the env's split); ``sample_id`` ranges over them."""
        split = self.split if split is None else split
        if split not in self.windows:
            raise ValueError(f"split={split!r} is invalid; accepted: train, validation, test")
        return len(self.windows[split])

    def _check_sample_id(self, sample_id, split: str) -> int:
        size = self.num_samples(split)
        if isinstance(sample_id, (bool, np.bool_)) or not isinstance(sample_id, (int, np.integer)) \
                or not 0 <= sample_id < size:
            raise ValueError(f"sample_id={sample_id!r} is invalid; accepted: an integer in [0, {size}) "
                             f"(episodes in split {split!r})")
        return int(sample_id)

    def _episode_budget(self, value: Any) -> KVBudget:
        """A budget given at reset or to a group: a form without a KV cap keeps the env's cap."""
        parsed = KVBudget.parse(value)
        return parsed if parsed.has_cap else self.kv_budget.with_tpot(parsed.tpot)

    def _new_streamer(self, split: str, sample_id: int) -> DocumentStreamer:
        doc_index, start = self.windows[split][sample_id]
        return DocumentStreamer(self.model, self.documents[doc_index][start:start + self.episode_tokens + 1],
                                threads=self.threads, storage=self.storage)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode: ``options`` may fix ``sample_id`` (a window of ``split``), ``split`` and ``budget``.

        A ``budget`` option without a KV cap (e.g. a number of ms, as agents pass) keeps the env's cap.
        """
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = sorted(set(options) - set(RESET_OPTIONS))
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}; accepted: {', '.join(RESET_OPTIONS)}")
        split = options.get("split", self.split)
        size = self.num_samples(split)
        if "sample_id" in options:
            sample_id = self._check_sample_id(options["sample_id"], split)
        else:
            sample_id = int(self.np_random.integers(size))
        budget = self.kv_budget
        if "budget" in options:
            budget = self._episode_budget(options["budget"])
            self._warn_if_budget_unreachable(budget)
        doc_index, start = self.windows[split][sample_id]
        self._budget_ms = budget.tpot.sample(self.np_random)
        self._cap_tokens = budget.cap_tokens(self.bytes_per_token)
        self._streamer = self._new_streamer(split, sample_id)
        self._episode_nll: list[float] = []
        self._chunk_infos: list[dict] = []
        self._last_nll = np.zeros(1)
        self._last_tpot = 0.0
        info = {"split": split, "sample_id": sample_id, "document": doc_index, "start": start,
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
        split = self.split if split is None else split
        sample_id = self._check_sample_id(sample_id, split)
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
        if self.latency == "estimated":
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
    def _records(self, split: str, sample_id: int, policies: Sequence[KVPolicy]) -> list["ChunkRecord"]:
        """The chunk records of an episode whose first chunks ran under ``policies``.

        Estimated mode: looked up per decision prefix, streaming only the chunks never streamed
        before, from the deepest snapshot of the stream (a forked cache) along the prefix.
        Measured mode: streamed afresh.
        """
        if self.latency != "estimated":
            streamer = self._new_streamer(split, sample_id)
            return [self._play_chunk(streamer, policy) for policy in policies]
        if len(self._memo) > MAX_MEMO_CHUNKS:
            self._memo.clear()
        records, streamer = [], None
        for depth, policy in enumerate(policies):
            key = (split, sample_id, tuple(policies[: depth + 1]))
            record = self._memo.get(key)
            if record is None:
                if streamer is None:
                    streamer = self._streamer_at(split, sample_id, policies[:depth])
                record = self._memo[key] = self._play_chunk(streamer, policy)
                self._snapshots[key] = streamer.fork()
                while len(self._snapshots) > MAX_SNAPSHOTS:
                    self._snapshots.popitem(last=False)
            else:
                streamer = None  # the next miss starts from a snapshot
            records.append(record)
        return records

    def _streamer_at(self, split: str, sample_id: int, prefix: Sequence[KVPolicy]) -> DocumentStreamer:
        """A streamer after ``prefix``: the deepest snapshot on the prefix, advanced through the rest."""
        for depth in range(len(prefix), 0, -1):
            snapshot = self._snapshots.get((split, sample_id, tuple(prefix[:depth])))
            if snapshot is not None:
                self._snapshots.move_to_end((split, sample_id, tuple(prefix[:depth])))
                streamer = snapshot.fork()
                break
        else:
            depth, streamer = 0, self._new_streamer(split, sample_id)
        for policy in prefix[depth:]:
            self._play_chunk(streamer, policy)
        return streamer

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
        sample_id = self._check_sample_id(sample_id, split)
        if isinstance(stage, bool) or not isinstance(stage, (int, np.integer)) or not 0 <= stage < self.episode_steps:
            raise ValueError(f"stage={stage!r} is invalid; accepted: an integer in [0, {self.episode_steps})")
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
        self._check_sample_id(sample_id, split)
        out = np.zeros(len(trajectories))
        for i, trajectory in enumerate(trajectories):
            codes = self._trajectory_codes(trajectory, self.episode_steps)
            if codes not in self._latency_memo:
                policies = [self._grid_policies[c] for c in codes]
                attended, pruned = simulate_schedule(policies, self.chunk_tokens, self.episode_tokens)
                self._latency_memo[codes] = float(np.mean(self.tpot_model.predict(pruned, attended)))
            out[i] = self._latency_memo[codes]
        return out

    def provenance(self) -> dict:
        """The model, the latency source and the knob grid, for run records."""
        return {"model": {"class": type(self.model).__name__,
                          "name_or_path": str(getattr(self.model.config, "_name_or_path", "") or "")},
                "latency": self.latency, "estimator": {"class": type(self.tpot_model).__name__,
                                                       **self.tpot_model.coefficients,
                                                       "noise_pct": self.tpot_model.noise_pct},
                "knob_space": {"policy": self.policy_class.policy_name(),
                               "grid": {k: list(v) for k, v in self.knob_grid.items()},
                               "chunk_tokens": self.chunk_tokens, "episode_tokens": self.episode_tokens}}

    # --- one chunk -----------------------------------------------------------------------------
    def _play_chunk(self, streamer: DocumentStreamer, policy: KVPolicy) -> "ChunkRecord":
        """Stream the next chunk under ``policy`` (the only place the model runs)."""
        first_seen = streamer.cursor
        trace = streamer.advance(self.chunk_tokens, policy)
        prune_steps = np.zeros(trace.num_tokens)
        for event in trace.prune_events:
            prune_steps[event.seen_tokens - 1 - first_seen] = 1.0
        return ChunkRecord(trace.nll, trace.cache_length, prune_steps,
                           tuple(dataclasses.asdict(e) for e in trace.prune_events), trace.step_ms,
                           int(streamer.cache.cache_length), int(streamer.cache.tokens_since_prune))

    def _tpot_of(self, record: "ChunkRecord") -> float:
        if self.latency == "estimated":
            return float(np.mean(self.tpot_model.predict(record.prune_steps, record.cache_length)))
        return float(np.median(record.step_ms))

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
            "score": score, "tpot_ms": tpot_ms, "latency_mode": self.latency, "budget_ms": budget_ms,
            "violated": bool(tpot_violated or kv_violated), "tpot_violated": tpot_violated,
            "kv_violated": kv_violated, "kv_cap_tokens": cap_tokens, "peak_kv_tokens": peak,
            "peak_kv_bytes": peak * self.bytes_per_token, "cache_length": record.cache_length.copy(),
            "prune_events": [dict(e) for e in record.prune_events], "chunk_reward": float(reward),
        }
        if self.latency == "measured":
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
        return np.clip(values, self.observation_space.low, self.observation_space.high)


@dataclasses.dataclass(frozen=True)
class ChunkRecord:
    """What streaming one chunk under one policy produced (budget-free: rewards are computed from it)."""

    nll: np.ndarray
    cache_length: np.ndarray
    prune_steps: np.ndarray
    prune_events: tuple
    step_ms: np.ndarray
    end_cache_length: int
    end_since_prune: int

    @property
    def num_tokens(self) -> int:
        return len(self.nll)


def episode_summary(chunk_infos: Sequence[dict]) -> dict:
    """The episode-level fields the last step's info carries (token-weighted over the chunks).

    ``score`` (the episode's mean-NLL score), ``latency_ms`` (mean TPOT per token),
    ``violated`` (any chunk violated a limit); the last chunk's own ``score`` and ``violated``
    move to ``chunk_score`` and ``chunk_violated``; ``violated_chunks`` counts violating chunks,
    ``episode_reward`` is the return.
    """
    last = chunk_infos[-1]
    tokens = np.array([len(i["nll"]) for i in chunk_infos], dtype=np.float64)
    tpot = np.array([i["tpot_ms"] for i in chunk_infos])
    scores = np.array([i["score"] for i in chunk_infos])
    return {"chunk_score": last["score"], "chunk_violated": last["violated"],
            "score": float(np.average(scores, weights=tokens)),
            "latency_ms": float(np.average(tpot, weights=tokens)),
            "violated": any(i["violated"] for i in chunk_infos),
            "violated_chunks": int(sum(i["violated"] for i in chunk_infos)),
            "episode_reward": float(sum(i["chunk_reward"] for i in chunk_infos))}


def simulate_schedule(policies: Sequence[KVPolicy], chunk_tokens: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(attended, pruned)`` per step when chunk ``c`` runs under ``policies[c]`` (no model run;
    :func:`simulate_cache` with the policy switched at chunk boundaries)."""
    attended, pruned = np.zeros(tokens, dtype=np.int64), np.zeros(tokens)
    held = 0
    for t in range(tokens):
        policy = policies[min(t // chunk_tokens, len(policies) - 1)]
        attended[t] = held + 1
        if policy.should_prune(held + 1):
            pruned[t], held = 1.0, policy.window
        else:
            held += 1
    return attended, pruned


# --- env ids ------------------------------------------------------------------------------------
def kv_env_id(policy_class: type[KVPolicy]) -> str:
    """The env id generated for a policy class: ``KV-<PolicyName>-v0``."""
    return f"KV-{policy_class.policy_name()}-v0"


def register_kv_env(policy_class: type[KVPolicy], knob_grid: dict | None = None) -> str:
    """Register ``KV-<PolicyName>-v0`` for one policy class (idempotent), with an optional action grid."""
    grid = kv_action_grid(policy_class, knob_grid)  # checked now, not at the first gym.make
    kwargs = {"policy": policy_class.policy_name()}
    if knob_grid is not None:
        kwargs["knob_grid"] = grid
    return register_env(kv_env_id(policy_class), StreamingKVEnv,
                        description=f"stream a document choosing {policy_class.policy_name()} knobs "
                                    f"({', '.join(grid)}) per chunk", **kwargs)


def register_kv_envs() -> list[str]:
    """Register ``StreamingKV-v0`` and ``KV-<Policy>-v0`` for every registered policy but FullCache (idempotent).

    Explicit: a policy registered after ``import envs`` gets its env id when this is called again.
    """
    ids = [register_env(STREAMING_KV_ID, StreamingKVEnv, policy="SinkWindow",
                        description="StreamingLLM sinks + window with lazy pruning, knobs chosen per chunk")]
    ids += [register_kv_env(cls) for cls in registered_kv_policies().values() if cls is not FullCache]
    return ids
