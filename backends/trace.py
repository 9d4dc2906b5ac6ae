"""Trace record / replay: run a backend once over a split and the whole knob grid, replay anywhere.

``record_trace`` stores, per (sample, configuration), the score, answer, token counts, measured
latency and the stage-1 summary in one SQLite file together with the backend identity, model
revision and device. Recording is resumable: rows are committed sample by sample, and a
restarted recording skips what is already there. Samples can be sharded over Ray actors
(``executor=RayExecutor(workers=N)``, one model per actor); this process still writes every row,
in sample order.

``TraceBackend`` serves envs from such a file with the same observations, rewards and infos as
the live backend for every recorded pair; an unrecorded pair is a clear error. It implements the
whole :class:`~backends.base.Backend` protocol. Every row is validated when the trace is opened:
a NULL, NaN or infinite number (score, latency, token count, stage-1 summary) is a
:class:`TraceError` naming the file, the table and the row, never a NaN reward later.
``TraceTable`` is the vectorised replay: rewards for many (sample, configuration, budget) rows
at once with numpy, for fast agent sweeps.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from backends.base import SPLITS, Sample, check_split
from backends.io import atomic_write_bytes, sha256_bytes
from backends.knobs import KnobConfig, KnobSpace
from backends.outcome import Outcome, Stage1State, TokenCounts, expected_token_counts
from backends.progress import progress as progress_bar
from backends.registry import load_backend
from backends.text_features import QUESTION_FEATURE_DIM, hashed_bag_of_words
from executors import LocalExecutor
from backends.checks import is_int

TRACE_FORMAT_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (name TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    split TEXT, sample_id INTEGER, question TEXT, reference TEXT, question_type INTEGER,
    image_h INTEGER, image_w INTEGER, prompt_tokens INTEGER, PRIMARY KEY (split, sample_id));
CREATE TABLE IF NOT EXISTS stage1 (
    split TEXT, sample_id INTEGER, tier TEXT, token_budget REAL, summary BLOB, vision_tokens INTEGER,
    vision_tokens_full INTEGER, stage1_ms REAL, PRIMARY KEY (split, sample_id, tier, token_budget));
CREATE TABLE IF NOT EXISTS outcomes (
    split TEXT, sample_id INTEGER, config_id INTEGER, answer TEXT, score REAL, new_tokens INTEGER,
    measured_ms REAL, empty_output INTEGER, nonfinite_logits INTEGER,
    PRIMARY KEY (split, sample_id, config_id));
"""


class TraceError(ValueError):
    """A trace file problem, or a (sample, configuration) pair the trace does not hold."""


def trace_grid(space: KnobSpace) -> list[KnobConfig]:
    """Configurations a trace records: every (tier, top-k, depth) at full token budget, plus
    every token budget at the highest tier with the model's own top-k and depth."""
    configs = [space.resolve(k) for k in space.grid()]
    if space.has_vision:
        for b in space.token_budgets:
            k = space.resolve(KnobConfig(tier=space.tier_names[-1], token_budget=b))
            if k not in configs:
                configs.append(k)
    return configs


def _connect(path: Path) -> sqlite3.Connection:
    """The trace being recorded at ``path`` (its tables created when missing)."""
    try:
        conn = sqlite3.connect(str(path))
        conn.executescript(_SCHEMA)
    except sqlite3.DatabaseError as exc:
        raise TraceError(f"trace file {str(path)!r} is not a readable trace ({exc}); accepted: a file written by "
                         f"record_trace") from None
    return conn


#: the tables of a trace (what a file must hold before it is read as one)
TRACE_TABLES = ("meta", "blobs", "samples", "stage1", "outcomes")


def _open_read_only(path: Path) -> sqlite3.Connection:
    """A trace opened for reading only (SQLite ``mode=ro``: the file is never written, nor grown),
    after checking it holds the trace tables; :class:`TraceError` naming it otherwise."""
    accepted = "accepted: a file written by record_trace"
    try:
        conn = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True)
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise TraceError(f"trace file {str(path)!r} is not a readable trace ({exc}); {accepted}") from None
    missing = [t for t in TRACE_TABLES if t not in tables]
    if missing:
        conn.close()
        raise TraceError(f"trace file {str(path)!r} is not a trace (an SQLite file without the table(s) "
                         f"{', '.join(missing)}); {accepted}")
    return conn


def _meta(conn: sqlite3.Connection) -> dict:
    return {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}


def _sample_row(backend, sample: Sample) -> tuple:
    h, w = sample.image_size
    return (sample.split, sample.sample_id, sample.question, sample.reference, sample.question_type, h, w,
            backend.prompt_tokens(sample))


@dataclass(frozen=True)
class _DescribeTask:
    """Worker task: the trace's metadata, the validation samples' rows and the split's size."""

    split: str
    configs: tuple | None


@dataclass(frozen=True)
class _SampleTask:
    """Worker task: run sample ``sample_id`` of ``split`` at ``configs`` (``(config_id, KnobConfig)`` pairs)."""

    split: str
    sample_id: int
    configs: tuple


def _describe(backend, task: _DescribeTask) -> dict:
    space = backend.knob_space
    configs = [space.resolve(k) for k in (task.configs or trace_grid(space))]
    by_type = backend.expected_new_tokens_by_type
    meta = {
        "format_version": TRACE_FORMAT_VERSION, "identity": backend.identity(), "knob_space": space.as_dict(),
        "question_types": list(backend.question_types), "summary_dim": int(backend.summary_dim),
        "expected_new_tokens": int(by_type[None]),
        "expected_new_tokens_by_type": {str(t): int(n) for t, n in by_type.items() if t is not None},
        "cost_params": {k: float(v) for k, v in backend.cost_params().items()},
        "configs": [k.as_dict() for k in configs],
    }
    return {"meta": meta, "configs": configs, "split_size": len(backend.samples(task.split)),
            "validation_rows": [_sample_row(backend, s) for s in backend.samples("validation")[:16]]}


def _run_sample(backend, task: _SampleTask) -> tuple[tuple, list[tuple], list[tuple]]:
    """The rows of one sample: its ``samples`` row, ``stage1`` rows (one per (tier, token budget))
    and ``outcomes`` rows (one per configuration), in a fixed order. Runs no I/O."""
    sample = backend.sample(task.split, task.sample_id)
    states: dict[tuple, Stage1State] = {}
    rows = []
    for cid, k in task.configs:
        key = (k.tier, k.token_budget)
        if key not in states:
            states[key] = backend.run_stage1(sample, k.tier, k.token_budget)
        o = backend.run_stage2(states[key], k)
        rows.append((task.split, task.sample_id, cid, o.answer, o.score, o.new_tokens, o.measured_ms,
                     int(o.empty_output), int(o.nonfinite_logits)))
    stage1_rows = []
    for (tier, budget), st in states.items():
        c = st.token_counts
        stage1_rows.append((task.split, task.sample_id, tier, budget, np.asarray(st.summary, np.float32).tobytes(),
                            c.vision_tokens, c.vision_tokens_full, st.measured_ms))
    return _sample_row(backend, sample), stage1_rows, rows


def _trace_work(backend, shared: Any, task: _DescribeTask | _SampleTask):
    """The work of one recording task on a worker holding ``backend`` (see :mod:`executors`)."""
    del shared
    return _describe(backend, task) if isinstance(task, _DescribeTask) else _run_sample(backend, task)


def record_trace(backend, path: str | os.PathLike, split: str = "test", sample_ids: Iterable[int] | None = None,
                 configs: Sequence[KnobConfig] | None = None, progress: bool = True,
                 estimator_file: str | os.PathLike | None = None, executor=None) -> Path:
    """Record ``backend`` over ``split`` and the knob grid into ``path`` (resumable).

    ``backend`` is a loaded backend, or its spec for :func:`backends.registry.load_backend` (a
    name or a dict with ``name``). The validation split's first samples' metadata is stored too,
    since envs compute their latency normaliser from typical validation inputs.
    ``estimator_file`` (a saved latency estimator of this backend on the recording device)
    travels inside the trace, so a replay on another machine charges the recording device's
    latencies.

    ``executor`` (an :class:`executors.Executor`; ``None``: this process) says where samples run.
    With :class:`executors.ray.RayExecutor`, the samples are sharded over its actors: each loads
    the backend once from the spec (a spec is then required) with one GPU where the driver sees
    CUDA, and a sample whose actor dies runs again on another. Whatever ran them, this process
    writes the rows, one transaction per sample in sample order, so the file holds the rows a
    single-process recording writes (timing columns aside: ``measured_ms`` and ``stage1_ms`` are
    measurements).
    """
    check_split(split)
    path = Path(path)
    executor = executor or LocalExecutor()
    if executor.in_process:
        setup = functools.partial(load_backend, backend)
    elif isinstance(backend, (str, dict)):
        setup = functools.partial(load_backend, copy.deepcopy(backend))
    else:
        raise TraceError(f"record_trace on {executor.name} workers got a loaded {type(backend).__name__}; accepted: "
                         f"its spec (a backend name or a dict with 'name' and options), which each worker loads")
    pool = executor.pool(setup, _trace_work, gpus=True)
    try:
        _record(pool, path, split, sample_ids, configs, progress, estimator_file)
    finally:
        pool.close()
    return path


def _record(pool, path: Path, split: str, sample_ids, configs, progress: bool, estimator_file) -> None:
    (described,) = pool.map([_DescribeTask(split, None if configs is None else tuple(configs))])
    meta, configs = described["meta"], described["configs"]
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = _connect(path)
    try:
        existing = _meta(conn)
        if existing:
            for key in ("identity", "configs", "knob_space"):
                if existing.get(key) != meta[key]:
                    raise TraceError(f"trace file {str(path)!r} was recorded with a different {key}; accepted: "
                                     f"resume with the same backend and configurations, or a new file")
        else:
            meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            with conn:
                conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        if estimator_file is not None:
            with conn:
                conn.execute("INSERT OR REPLACE INTO blobs VALUES ('estimator', ?)",
                             (Path(estimator_file).read_bytes(),))
        ids = list(range(described["split_size"])) if sample_ids is None else [int(i) for i in sample_ids]
        with conn:
            conn.executemany("INSERT OR IGNORE INTO samples VALUES (?,?,?,?,?,?,?,?)", described["validation_rows"])
        done = {(sid, cid) for sid, cid in conn.execute("SELECT sample_id, config_id FROM outcomes WHERE split=?",
                                                         (split,))}
        tasks = [_SampleTask(split, sid, tuple((cid, k) for cid, k in enumerate(configs) if (sid, cid) not in done))
                 for sid in ids]
        todo = [t for t in tasks if t.configs]
        with progress_bar(len(ids), f"record {split}", unit="sample", enabled=progress) as bar:
            bar.update(len(ids) - len(todo))
            for rows in pool.map(todo):
                _write_sample(conn, path, *rows)
                bar.update()
    finally:
        conn.close()


def _write_sample(conn, path: Path, sample_row: tuple, stage1_rows: list[tuple], outcome_rows: list[tuple]) -> None:
    """Store one sample's rows (one transaction), validated first (:func:`check_outcome_row`,
    :func:`check_stage1_row`): a non-finite score or latency stops the recording with a :class:`TraceError`."""
    outcome_rows = [check_outcome_row(path, row) for row in outcome_rows]
    stage1_rows = [check_stage1_row(path, row) for row in stage1_rows]
    with conn:  # one transaction per sample: a killed recording loses at most this sample
        conn.execute("INSERT OR IGNORE INTO samples VALUES (?,?,?,?,?,?,?,?)", sample_row)
        conn.executemany("INSERT OR REPLACE INTO stage1 VALUES (?,?,?,?,?,?,?,?)", stage1_rows)
        conn.executemany("INSERT OR REPLACE INTO outcomes VALUES (?,?,?,?,?,?,?,?,?)", outcome_rows)


# ------------------------------------------------------------------------------------------------
# row validation (on write and on read)
# ------------------------------------------------------------------------------------------------
def _finite_number(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def _bad_row(path: Path, table: str, key: tuple, column: str, value: Any, accepted: str,
             shown: str | None = None) -> TraceError:
    split, sid = key[0], key[1]
    rest = f", config_id={key[2]}" if table == "outcomes" else f", tier={key[2]!r}, token_budget={key[3]!r}"
    what = shown or ("NULL" if value is None else repr(value))
    return TraceError(f"trace file {str(path)!r}: {table} row (split={split!r}, sample_id={sid}{rest}) has "
                      f"{column}={what}; accepted: {accepted}. Record this sample again (delete its rows) or use "
                      f"the live backend")


def check_outcome_row(path: Path, row: tuple) -> tuple:
    """An ``outcomes`` row if its numbers are finite (score, measured_ms) and its counts are
    integers >= 0; :class:`TraceError` naming the row otherwise."""
    key = row[:3]
    _, _, _, answer, score, new_tokens, measured_ms, empty, nonfinite = row
    for column, value in (("score", score), ("measured_ms", measured_ms)):
        if not _finite_number(value):
            raise _bad_row(path, "outcomes", key, column, value, "a finite number")
    if not is_int(new_tokens) or new_tokens < 0:
        raise _bad_row(path, "outcomes", key, "new_tokens", new_tokens, "an integer >= 0")
    if answer is None:
        raise _bad_row(path, "outcomes", key, "answer", answer, "a string")
    return row


def check_stage1_row(path: Path, row: tuple) -> tuple:
    """A ``stage1`` row if its summary and stage-1 time are finite and its token counts integers
    >= 0; :class:`TraceError` naming the row otherwise."""
    key = row[:4]
    _, _, _, _, summary, vision_tokens, vision_tokens_full, stage1_ms = row
    if not _finite_number(stage1_ms):
        raise _bad_row(path, "stage1", key, "stage1_ms", stage1_ms, "a finite number")
    for column, value in (("vision_tokens", vision_tokens), ("vision_tokens_full", vision_tokens_full)):
        if not is_int(value) or value < 0:
            raise _bad_row(path, "stage1", key, column, value, "an integer >= 0")
    if not isinstance(summary, (bytes, bytearray, memoryview)) or len(summary) % 4:
        raise _bad_row(path, "stage1", key, "summary", summary, "float32 bytes",
                       shown=None if summary is None else f"<{type(summary).__name__}>")
    values = np.frombuffer(bytes(summary), np.float32)
    if not np.isfinite(values).all():
        raise _bad_row(path, "stage1", key, "summary", values, "finite float32 values",
                       shown=f"<{int((~np.isfinite(values)).sum())} non-finite values>")
    return row


@dataclass
class _Stage1Row:
    summary: np.ndarray
    vision_tokens: int
    vision_tokens_full: int
    stage1_ms: float


class TraceBackend:
    """A backend that replays a recorded trace (same observations, rewards and infos as live).

    Args:
        path: the trace file.
        split_fractions: a trace whose outcomes cover one split only (``python -m backends.trace
            record split=test``) serves it as train / validation / test, divided by a seeded
            permutation in these proportions (``conf/backend/trace.yaml``: 0.8 / 0.1 / 0.1, as one-file
            datasets are; sample ids renumbered per split); ``None`` (default) keeps the recorded splits
            as they are. A trace recorded over several splits is always served as recorded.
        split_seed: seed of that permutation.
    """

    def __init__(self, path: str | os.PathLike, split_fractions: Sequence[float] | None = None, split_seed: int = 0):
        self.path = Path(path)
        if not self.path.is_file():
            raise TraceError(f"trace file {str(self.path)!r} does not exist; accepted: a file written by record_trace")
        conn = _open_read_only(self.path)
        try:
            self.meta = _meta(conn)
            if self.meta.get("format_version") != TRACE_FORMAT_VERSION:
                raise TraceError(f"trace file {str(self.path)!r} has format {self.meta.get('format_version')!r}; "
                                 f"accepted: {TRACE_FORMAT_VERSION}")
            self.knob_space = KnobSpace.from_dict(self.meta["knob_space"])
            self.question_types = tuple(self.meta["question_types"])
            self.summary_dim = int(self.meta["summary_dim"])
            self.expected_new_tokens = int(self.meta["expected_new_tokens"])
            # Traces written before per-type lengths existed hold only the overall mean.
            self.expected_new_tokens_by_type = {None: self.expected_new_tokens, **{
                int(t): int(n) for t, n in self.meta.get("expected_new_tokens_by_type", {}).items()}}
            self.configs = [KnobConfig(**c) for c in self.meta["configs"]]
            self.config_ids = {k: i for i, k in enumerate(self.configs)}
            self._samples: dict[str, list[Sample]] = {s: [] for s in SPLITS}
            self._prompt_tokens: dict[tuple, int] = {}
            for split, sid, q, ref, qt, h, w, pt in conn.execute(
                    "SELECT * FROM samples ORDER BY split, sample_id"):
                self._samples[split].append(Sample(sid, split, q, ref, None, qt, {"image_size": (h, w)}))
                self._prompt_tokens[(split, sid)] = pt
            self._by_id = {(s.split, s.sample_id): s for items in self._samples.values() for s in items}
            self._stage1 = {(split, sid, tier, tb): _Stage1Row(np.frombuffer(blob, np.float32).copy(), vt, vtf, ms)
                            for split, sid, tier, tb, blob, vt, vtf, ms in (
                                check_stage1_row(self.path, row) for row in conn.execute("SELECT * FROM stage1"))}
            self._outcomes = {row[:3]: row[3:] for row in (
                check_outcome_row(self.path, row) for row in conn.execute("SELECT * FROM outcomes"))}
            self._cost_params = {k: float(v) for k, v in self.meta.get("cost_params", {}).items()}
            blob = conn.execute("SELECT data FROM blobs WHERE name='estimator'").fetchone()
            self._estimator_bytes = None if blob is None else bytes(blob[0])
        except (sqlite3.DatabaseError, KeyError, json.JSONDecodeError) as exc:
            raise TraceError(f"trace file {str(self.path)!r} is corrupted or incomplete ({exc!r})") from None
        finally:
            conn.close()
        recorded = sorted({key[0] for key in self._outcomes})
        self.source_splits = tuple(recorded)
        if len(recorded) == 1 and split_fractions is not None:
            self._divide(recorded[0], split_fractions, split_seed)

    def _divide(self, split: str, fractions: Sequence[float], seed: int) -> None:
        """Serve the recorded samples of ``split`` (those with outcomes) as train / validation / test."""
        from backends.vqa_data import seeded_split

        fractions = tuple(float(f) for f in fractions)
        if len(fractions) != 3 or not all(f > 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
            raise TraceError(f"split_fractions={list(fractions)!r} is invalid; accepted: three positive fractions "
                             f"(train, validation, test) summing to 1")
        with_outcomes = {key[:2] for key in self._outcomes}
        recorded = [s for s in self._samples[split] if (split, s.sample_id) in with_outcomes]
        if len(recorded) < 3:
            raise TraceError(f"trace file {str(self.path)!r} holds {len(recorded)} sample(s) of split {split!r}; "
                             f"accepted: at least 3 to serve as train, validation and test (record more samples)")
        renamed: dict[tuple, tuple] = {}
        samples: dict[str, list[Sample]] = {s: [] for s in SPLITS}
        for target, rows in seeded_split(len(recorded), fractions, seed).items():
            for new_id, row in enumerate(rows):
                old = recorded[int(row)]
                renamed[(old.split, old.sample_id)] = (target, new_id)
                samples[target].append(dataclasses.replace(old, split=target, sample_id=new_id))
        self._samples = samples
        self._by_id = {(s.split, s.sample_id): s for items in samples.values() for s in items}
        self._prompt_tokens = {renamed[k]: v for k, v in self._prompt_tokens.items() if k in renamed}
        self._stage1 = {(*renamed[k[:2]], *k[2:]): v for k, v in self._stage1.items() if k[:2] in renamed}
        self._outcomes = {(*renamed[k[:2]], *k[2:]): v for k, v in self._outcomes.items() if k[:2] in renamed}

    #: the question text is recorded, so its feature is recomputed exactly as live backends do
    question_feature_dim = QUESTION_FEATURE_DIM

    def question_features(self, sample: Sample) -> np.ndarray:
        """``[question_feature_dim]`` float32 hashed bag of words of the recorded question."""
        return hashed_bag_of_words(sample.question, self.question_feature_dim)

    @property
    def device(self):
        """``torch.device('cpu')``: replay runs no model (the recording device is in ``identity()``)."""
        import torch

        return torch.device("cpu")

    def cost_params(self) -> dict[str, float]:
        """The recorded backend's cost parameters (``{}`` for traces recorded before they were stored)."""
        return dict(self._cost_params)

    def recorded_estimator_file(self) -> str | None:
        """The latency estimator recorded with the trace, as a file (``None`` if none)."""
        if self._estimator_bytes is None:
            return None
        # in the temporary folder, named by content: a trace is only read, nothing is written beside it
        target = Path(tempfile.gettempdir()) / f"knobgym-trace-{sha256_bytes(self._estimator_bytes)[:20]}.estimator"
        if target.is_symlink() or not target.is_file() or target.read_bytes() != self._estimator_bytes:
            if target.is_symlink():
                target.unlink()
            atomic_write_bytes(target, self._estimator_bytes)
        return str(target)

    # ----------------------------------------------------------------- Backend surface
    def identity(self) -> dict[str, Any]:
        """The recorded backend's identity (so its cached latency estimator is found)."""
        return dict(self.meta["identity"])

    def samples(self, split: str) -> Sequence[Sample]:
        """Recorded samples of ``split``, indexed by position (``sample(split, id)`` looks up by id)."""
        return self._samples[check_split(split)]

    def sample(self, split: str, sample_id: int) -> Sample:
        key = (check_split(split), int(sample_id))
        if key not in self._by_id:
            raise TraceError(f"sample {sample_id!r} of split {split!r} is not in trace {str(self.path)!r}; accepted: "
                             f"one of {len(self._samples[split])} recorded sample ids")
        return self._by_id[key]

    def prompt_tokens(self, sample: Sample) -> int:
        return self._prompt_tokens[(sample.split, sample.sample_id)]

    def expected_token_counts(self, sample: Sample, knobs: KnobConfig) -> TokenCounts:
        return expected_token_counts(self, sample, knobs)

    def run_stage1(self, sample: Sample, tier: str | None, token_budget: float = 1.0) -> Stage1State:
        tier = self.knob_space.resolve(KnobConfig(tier=tier, token_budget=token_budget)).tier
        row = self._stage1.get((sample.split, sample.sample_id, tier, float(token_budget)))
        if row is None:
            raise TraceError(f"stage 1 of sample {sample.sample_id} ({sample.split}) at tier={tier!r}, "
                             f"token_budget={token_budget} was not recorded in {str(self.path)!r}")
        counts = TokenCounts(self.prompt_tokens(sample), row.vision_tokens_full, row.vision_tokens)
        return Stage1State(sample.sample_id, tier, counts, row.summary.copy(), row.stage1_ms,
                           payload=(sample, float(token_budget)))

    def run_stage2(self, state: Stage1State, knobs: KnobConfig) -> Outcome:
        sample, token_budget = state.payload
        knobs = self.knob_space.resolve(knobs)
        cid = self.config_ids.get(knobs)
        row = None if cid is None else self._outcomes.get((sample.split, sample.sample_id, cid))
        if row is None:
            raise TraceError(f"pair (sample {sample.sample_id} of {sample.split!r}, {knobs}) was not recorded in "
                             f"{str(self.path)!r}; record it with record_trace or use the live backend")
        answer, score, new_tokens, measured_ms, empty, nonfinite = row
        counts = TokenCounts(**{**state.token_counts.__dict__, "new_tokens": int(new_tokens)})
        return Outcome(answer=answer, reference=sample.reference, score=float(score), token_counts=counts,
                       measured_ms=float(measured_ms), stage1_ms=state.measured_ms, knobs=knobs,
                       empty_output=bool(empty), nonfinite_logits=bool(nonfinite))

    def run_stage2_batch(self, state: Stage1State, knobs_list: Sequence[KnobConfig]) -> list[Outcome]:
        """Recorded outcomes, one lookup per configuration (a replay has nothing to batch)."""
        return [self.run_stage2(state, k) for k in knobs_list]

    def run(self, sample: Sample, knobs: KnobConfig) -> Outcome:
        knobs = self.knob_space.resolve(knobs)
        return self.run_stage2(self.run_stage1(sample, knobs.tier, knobs.token_budget), knobs)

    # ----------------------------------------------------------------- vectorised replay
    def table(self, split: str, estimator) -> "TraceTable":
        """A :class:`TraceTable` of this split (latencies estimated once, vectorised)."""
        return TraceTable(self, split, estimator)


class TraceTable:
    """Dense ``[sample, configuration]`` arrays of score and estimated latency for batched replay.

    Rewards are computed from these arrays by ``envs.replay`` with the shared reward definition.
    """

    def __init__(self, trace: TraceBackend, split: str, estimator):
        n_configs = len(trace.configs)
        self.samples = [s for s in trace.samples(split)
                        if all((s.split, s.sample_id, c) in trace._outcomes for c in range(n_configs))]
        if not self.samples:
            raise TraceError(f"trace {str(trace.path)!r} holds no fully recorded sample of split {split!r}")
        self.configs = trace.configs
        self.score = np.zeros((len(self.samples), n_configs), np.float64)
        knobs, counts = [], []
        for i, s in enumerate(self.samples):
            for c, k in enumerate(trace.configs):
                outcome = trace.run(s, k)
                self.score[i, c] = outcome.score
                knobs.append(outcome.knobs)
                counts.append(outcome.token_counts)
        self.latency_ms = np.asarray(estimator.predict(knobs, counts), np.float64).reshape(self.score.shape)


def load_trace_backend(path: str | None = None, split_fractions: Sequence[float] | None = None,
                       split_seed: int = 0) -> TraceBackend:
    """``backend=trace`` factory: ``load_backend("trace", path=...)`` (``conf/backend/trace.yaml``)."""
    if path is None:
        raise TraceError("backend=trace needs backend.path=<trace file>; record one with "
                         "`python -m backends.trace record backend=<name> split=<split>`")
    return TraceBackend(path, split_fractions, split_seed)


if __name__ == "__main__":  # python -m backends.trace record ...: the command line lives beside this module
    from backends.trace_cli import main

    main()
