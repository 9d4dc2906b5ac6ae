"""The backend-side runner envs use: stage 1 shared across a group, outcomes memoised, bounded.

Greedy decoding is deterministic, so once a (sample, knobs) pair has run its outcome can be
reused; GRPO groups, the baselines and the oracle revisit the same pairs many times. The runner
keeps two bounded least-recently-used memos with declared sizes, so memory stays flat however
long a run is:

- stage-1 states per ``(split, sample_id, tier, token_budget)`` (:attr:`StageRunner.stage1_cache_size`
  entries; a state holds the block-1 KV cache, so this one is small);
- outcomes per ``(split, sample_id, resolved knobs)`` (:attr:`StageRunner.outcome_cache_size`
  entries), only when ``memoise_outcomes`` (envs in estimated-latency mode: a measured-latency env
  must time every run).

A memoised stage-1 state carries its measured time, which is charged to every run that uses it,
as if each run were its own episode.

Groups (:meth:`StageRunner.run_group`): with ``batch_stage2`` (envs in estimated-latency mode)
the members of a group that share a stage-1 state run their stage 2 as one batch
(:meth:`~backends.base.Backend.run_stage2_batch`); without it (measured latency, where every run
must be timed on its own) each member runs alone, exactly as :meth:`StageRunner.run`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, Sequence, TypeVar

from backends.checks import check_int
from backends.base import Backend, Sample
from backends.knobs import KnobConfig
from backends.outcome import Outcome, Stage1State

V = TypeVar("V")


class LRUCache(Generic[V]):
    """A dict bounded to ``max_size`` entries that forgets the least recently used one first."""

    def __init__(self, max_size: int):
        check_int("max_size", max_size, 1)
        self.max_size = max_size
        self._items: OrderedDict[Hashable, V] = OrderedDict()

    def get_or_compute(self, key: Hashable, compute: Callable[[], V]) -> V:
        """The value of ``key``, computed (and stored) on a miss; the entry becomes the most recent."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = compute()
        self.put(key, value)
        return value

    def get(self, key: Hashable, default: Any = None) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return default

    def put(self, key: Hashable, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_size:
            self._items.popitem(last=False)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()


class StageRunner:
    """Runs one backend for an env: ``stage1`` and ``run`` with the memos described above.

    Args:
        backend: the :class:`~backends.base.Backend` to run.
        memoise_outcomes: reuse the outcome of a (sample, knobs) pair already run.
        batch_stage2: :meth:`run_group` runs the members sharing a stage-1 state as one stage-2
            batch (default ``False``: one run per member). Batched outcomes equal unbatched ones up
            to float rounding, but their ``measured_ms`` is a share of the batch's time, so a
            measured-latency env leaves this off.
        stage1_cache_size: stage-1 states kept (default 256).
        outcome_cache_size: outcomes kept (default 200 000).
    """

    def __init__(self, backend: Backend, *, memoise_outcomes: bool, batch_stage2: bool = False,
                 stage1_cache_size: int = 256, outcome_cache_size: int = 200_000):
        if not isinstance(backend, Backend):
            raise ValueError(f"backend={backend!r} is invalid; accepted: an object implementing "
                             f"backends.base.Backend")
        self.backend = backend
        self.memoise_outcomes = bool(memoise_outcomes)
        self.batch_stage2 = bool(batch_stage2)
        self.stage1_cache_size, self.outcome_cache_size = stage1_cache_size, outcome_cache_size
        self._stage1: LRUCache[Stage1State] = LRUCache(stage1_cache_size)
        self._outcomes: LRUCache[Outcome] = LRUCache(outcome_cache_size)

    def stage1(self, sample: Sample, tier: str | None, token_budget: float = 1.0) -> Stage1State:
        """The stage-1 state of ``sample`` at ``tier`` and ``token_budget`` (run once while memoised)."""
        key = (sample.split, sample.sample_id, tier, float(token_budget))
        return self._stage1.get_or_compute(key, lambda: self.backend.run_stage1(sample, tier, token_budget))

    def run(self, sample: Sample, knobs: KnobConfig, state: Stage1State | None = None) -> Outcome:
        """The outcome of ``sample`` under ``knobs`` (validated and resolved here, once per action)."""
        knobs = self.backend.knob_space.resolve(knobs)
        key = (sample.split, sample.sample_id, knobs)
        if self.memoise_outcomes and key in self._outcomes:
            return self._outcomes.get(key)
        state = state or self.stage1(sample, knobs.tier, knobs.token_budget)
        outcome = self.backend.run_stage2(state, knobs)
        if self.memoise_outcomes:
            self._outcomes.put(key, outcome)
        return outcome

    def run_group(self, sample: Sample, knobs_list: Sequence[KnobConfig]) -> list[Outcome]:
        """The outcomes of ``sample`` under each of ``knobs_list``, in order, as :meth:`run` would give.

        With :attr:`batch_stage2`, the members not already memoised are grouped by stage-1 state
        (tier and token budget); each state runs once and its members' distinct configurations run
        as one :meth:`~backends.base.Backend.run_stage2_batch` (a lone one through ``run_stage2``);
        outcomes fill the memo as
        :meth:`run` does. Without it, each member runs alone through :meth:`run` (identical members
        too, unless memoised): what a measured-latency caller needs, every run timed on its own.
        """
        if not self.batch_stage2:
            return [self.run(sample, k) for k in knobs_list]
        resolved = [self.backend.knob_space.resolve(k) for k in knobs_list]
        outcomes: list[Outcome | None] = [None] * len(resolved)
        # stage-1 key -> distinct knobs -> positions in the group
        pending: dict[tuple, dict[KnobConfig, list[int]]] = {}
        for i, knobs in enumerate(resolved):
            key = (sample.split, sample.sample_id, knobs)
            if self.memoise_outcomes and key in self._outcomes:
                outcomes[i] = self._outcomes.get(key)
            else:
                pending.setdefault((knobs.tier, knobs.token_budget), {}).setdefault(knobs, []).append(i)
        for (tier, token_budget), members in pending.items():
            state = self.stage1(sample, tier, token_budget)
            distinct = list(members)
            batch = (self.backend.run_stage2_batch(state, distinct) if len(distinct) > 1
                     else [self.backend.run_stage2(state, distinct[0])])
            for knobs, outcome in zip(distinct, batch):
                for i in members[knobs]:
                    outcomes[i] = outcome
                if self.memoise_outcomes:
                    self._outcomes.put((sample.split, sample.sample_id, knobs), outcome)
        return outcomes

    def clear(self) -> None:
        """Forget memoised stage-1 states and outcomes (benchmarks use this to time real runs)."""
        self._stage1.clear()
        self._outcomes.clear()

    def __len__(self) -> int:
        """Entries held in both memos together."""
        return len(self._stage1) + len(self._outcomes)
