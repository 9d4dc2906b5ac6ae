"""The decoding latency estimator: milliseconds of one answer from (decoding knobs, token counts).

Features (:data:`FEATURE_NAMES`): the strategy (one-hot), beam width, temperature, draft
lookahead, expected acceptance (accepted draft tokens per target pass), prompt and generated
tokens, chat template, and the cost terms they imply: target passes (one per token, or
``new / (1 + accepted per pass)`` for speculative decoding), draft passes, beam-token work
(``beams * new tokens``) and prompt work. The regressor is latency_model's own
:class:`~latency_model.estimator.AnalyticTreeModel` (non-negative linear model on the cost terms,
fitted for relative error, times boosted trees on all features), as for the vision estimator.

Expected acceptance is learned from the profile: the mean accepted draft tokens per target pass
of each (lookahead, chat template) in the profile. When the actual acceptance of a finished run
is known (the env's reward for a speculative answer), it is passed instead.

Profiling (:func:`profile_decoding`): every distinct configuration of the backend's space on
``samples`` validation questions spread over question types; ``warmup`` untimed runs, then
``repeats`` rounds in a fresh random order, median per point. The clock is the process's CPU
time on a CPU device (one torch thread: on a shared machine the wall clock mostly measures other
tenants) and CUDA events after a synchronize on a GPU. A quarter of the samples are held out:
:func:`held_out_report` fits on the others and scores predictions on them.

Cache (:func:`get_decoding_estimator`): the profile, not a fitted model, is stored as checksummed
JSON (:mod:`backends.io`) in ``$KNOBGYM_CACHE/latency/decoding-<backend>-<key>.json`` (the key
hashes the backend identity and the device fingerprint, :func:`latency_model.cache.cache_key`).
Loading refits deterministically (fixed seeds, fixed row order), so every process gets
bit-identical predictions, and nothing is unpickled.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backends.checks import check_int
from backends.decoding.strategies import DECODING_STRATEGIES, strategy
from backends.io import read_checksummed_json, write_checksummed_json
from latency_model.cache import cache_key, default_cache_dir
from latency_model import speed
from latency_model.estimator import AnalyticModel, AnalyticTreeModel
from latency_model.profile import FINGERPRINT_KEYS_THAT_MATTER, RunTimer, device_fingerprint
from latency_model.report import Accuracy, accuracy

PROFILE_FORMAT = "knobgym-decoding-profile/1"
STRATEGY_NAMES = tuple(DECODING_STRATEGIES)
FEATURE_NAMES = (*(f"is_{name}" for name in STRATEGY_NAMES), "num_beams", "temperature", "lookahead",
                 "expected_acceptance", "chat_template", "prompt_tokens", "new_tokens", "target_passes",
                 "draft_passes", "beam_token_work", "prompt_work", "speculative_rounds")
#: cost terms of the non-negative linear part (plus a constant)
ANALYTIC_COLUMNS = ("target_passes", "draft_passes", "beam_token_work", "prompt_work", "new_tokens",
                    "is_beam", "is_sampling", "is_speculative", "speculative_rounds")


@dataclass(frozen=True)
class DecodingProfileSettings:
    """How much to profile: ``samples`` questions x every configuration x ``repeats`` timed runs."""

    samples: int = 16
    repeats: int = 3
    warmup: int = 4
    split: str = "validation"
    clock: str = "auto"  # auto: cpu time on a CPU device, CUDA events on a GPU; or "wall"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("samples", 4), ("repeats", 1), ("warmup", 0)):
            value = getattr(self, name)
            check_int(name, value, low)
        if self.clock not in ("auto", "wall"):
            raise ValueError(f"clock={self.clock!r} is invalid; accepted: auto, wall")


def _knob_row(k) -> dict:
    return {"strategy": k.strategy, "num_beams": int(k.num_beams), "temperature": float(k.temperature),
            "num_assistant_tokens": int(k.num_assistant_tokens), "chat_template": bool(k.chat_template)}


# ------------------------------------------------------------------------------------------------
# profiling
# ------------------------------------------------------------------------------------------------
def choose_profile_samples(samples: Sequence, n: int) -> list:
    """``n`` samples spread evenly over question types (round robin over types, in order)."""
    by_type: dict[int, list] = {}
    for s in samples:
        by_type.setdefault(s.question_type, []).append(s)
    chosen, i = [], 0
    while len(chosen) < min(n, len(samples)):
        for t in sorted(by_type):
            if i < len(by_type[t]) and len(chosen) < n:
                chosen.append(by_type[t][i])
        i += 1
    return chosen


def profile_decoding(backend, settings: DecodingProfileSettings = DecodingProfileSettings(),
                     progress: bool = False) -> dict:
    """Time every configuration of ``backend.knob_space`` on a spread of samples; returns the profile dict."""
    configs = backend.knob_space.configurations()
    samples = choose_profile_samples(backend.samples(settings.split), settings.samples)
    cuda = str(backend.device).startswith("cuda")
    timer = RunTimer(backend.device, cpu_time=(settings.clock == "auto" and not cuda))
    points = [(c, s) for s in samples for c in configs]
    for c, s in points[: settings.warmup]:
        backend.run(s, c)
    rng = np.random.default_rng(settings.seed)
    times: list[list[float]] = [[] for _ in points]
    outcomes: list[Any] = [None] * len(points)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(points) * settings.repeats, desc="profiling decoding", unit="run")
    for _ in range(settings.repeats):
        for i in rng.permutation(len(points)):
            c, s = points[i]
            ms, outcome = timer.time(backend.run, s, c)
            times[i].append(ms)
            outcomes[i] = outcome
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    holdout_ids = {s.sample_id for j, s in enumerate(samples) if j % 4 == 3}
    rows = []
    for (c, s), runs, o in zip(points, times, outcomes):
        rows.append({**_knob_row(c), "split": s.split, "sample_id": int(s.sample_id),
                     "question_type": int(s.question_type), "holdout": s.sample_id in holdout_ids,
                     "prompt_tokens": int(o.token_counts.prompt_tokens), "new_tokens": int(o.new_tokens),
                     "target_passes": int(o.target_passes), "draft_passes": int(o.draft_passes),
                     "accepted_per_pass": float(o.accepted_per_pass or 0.0),
                     "latency_ms": float(np.median(runs)), "latency_runs_ms": [float(x) for x in runs]})
    return {"format": PROFILE_FORMAT, "backend": backend.identity(),
            "device": device_fingerprint(backend.device), "settings": vars(settings) | {},
            "clock": "cuda" if cuda else ("cpu" if settings.clock == "auto" else "wall"), "rows": rows}


# ------------------------------------------------------------------------------------------------
# the estimator
# ------------------------------------------------------------------------------------------------
@dataclass
class DecodingLatencyEstimator:
    """Predicts the latency (ms) of decoding answers; fitted from a profile dict (see the module docstring)."""

    profile: dict
    mask: np.ndarray | None = None  # rows used for fitting (None: all)
    seed: int = 0
    acceptance: dict = field(init=False)

    def __post_init__(self) -> None:
        rows = self._rows()
        if len(rows) < 4:
            raise ValueError(f"cannot fit a decoding latency estimator on {len(rows)} rows; accepted: >= 4")
        groups: dict[tuple, list[float]] = {}
        for r in rows:
            if strategy(r["strategy"]).uses_draft:
                groups.setdefault((int(r["num_assistant_tokens"]), bool(r["chat_template"])), []).append(
                    float(r["accepted_per_pass"]))
        self.acceptance = {k: float(np.mean(v)) for k, v in sorted(groups.items())}
        X = self._features([_Knobs(**{k: r[k] for k in _Knobs.__annotations__}) for r in rows],
                           [(r["prompt_tokens"], r["new_tokens"],
                             r["accepted_per_pass"] if strategy(r["strategy"]).uses_draft else None) for r in rows])
        y = np.array([r["latency_ms"] for r in rows], dtype=np.float64)
        self.model = AnalyticTreeModel(FEATURE_NAMES, ANALYTIC_COLUMNS, self.seed).fit(X, y)
        self.baseline = AnalyticModel(FEATURE_NAMES, ("new_tokens",)).fit(X, y)

    def _rows(self) -> list[dict]:
        rows = self.profile["rows"]
        return rows if self.mask is None else [r for r, keep in zip(rows, self.mask) if keep]

    @property
    def fingerprint(self) -> dict:
        return dict(self.profile["device"])

    @property
    def identity(self) -> dict:
        return dict(self.profile["backend"])

    def expected_acceptance(self, lookahead: int, chat_template: bool) -> float:
        """Mean accepted draft tokens per target pass measured for this lookahead and prompt format."""
        key = (int(lookahead), bool(chat_template))
        if key in self.acceptance:
            return self.acceptance[key]
        if not self.acceptance:
            return 0.0
        nearest = min(self.acceptance, key=lambda k: (abs(k[0] - key[0]), k[1] != key[1]))
        return self.acceptance[nearest]

    def _features(self, configs: Sequence, counts: Sequence) -> np.ndarray:
        X = np.zeros((len(configs), len(FEATURE_NAMES)), dtype=np.float64)
        col = {n: i for i, n in enumerate(FEATURE_NAMES)}
        for i, (k, c) in enumerate(zip(configs, counts)):
            prompt, new, given = (*c, None)[:3] if isinstance(c, tuple) else (
                c.prompt_tokens, c.new_tokens, getattr(c, "accepted_per_pass", None))
            decoding = strategy(k.strategy)
            X[i, col[f"is_{decoding.name}"]] = 1.0
            acc = 0.0
            if decoding.uses_draft:
                look = int(getattr(k, decoding.knob))
                acc = float(given) if given is not None else self.expected_acceptance(look, k.chat_template)
            for name, value in decoding.cost(k, prompt, new, acc).items():
                X[i, col[name]] = value
            X[i, col["expected_acceptance"]] = acc
            X[i, col["chat_template"]] = float(bool(k.chat_template))
            X[i, col["prompt_tokens"]] = prompt
            X[i, col["new_tokens"]] = new
        return X

    def predict(self, configs: Sequence, token_counts: Sequence) -> np.ndarray:
        """Latency (ms, float64 ``[N]``) of each answer (the interface every latency estimator shares,
        :class:`latency_model.protocol.LatencyPredictor`).

        ``token_counts``: per answer, a :class:`~backends.decoding.backend.DecodingTokenCounts` (before
        running: speculative decoding at its expected acceptance), a :class:`RunTokenCounts` (a
        finished run, with its measured acceptance) or a tuple ``(prompt_tokens, new_tokens[,
        accepted_per_pass])``.
        """
        if not len(configs):
            return np.zeros(0)
        return np.asarray(self.model.predict(self._features(configs, token_counts)), dtype=np.float64)

    def predict_baseline(self, configs: Sequence, token_counts: Sequence) -> np.ndarray:
        """The tokens-only baseline ``a + b * new_tokens`` (what the report compares against)."""
        return np.asarray(self.baseline.predict(self._features(configs, token_counts)), dtype=np.float64)


@dataclass(frozen=True)
class RunTokenCounts:
    """Token counts of a finished run, with speculative decoding's measured accepted draft tokens
    per target pass (``None``: not speculative, or unknown: the expected acceptance is used)."""

    prompt_tokens: int
    new_tokens: int
    accepted_per_pass: float | None = None


@dataclass(frozen=True)
class _Knobs:
    """Knob fields of a profile row (the estimator needs only these, not the backend's classes)."""

    strategy: str
    num_beams: int
    temperature: float
    num_assistant_tokens: int
    chat_template: bool


# ------------------------------------------------------------------------------------------------
# held-out report
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodingHeldOutReport:
    """Accuracy on held-out samples of the estimator and of the tokens-only baseline, per strategy too."""

    estimator: Accuracy
    baseline: Accuracy
    per_strategy: dict
    train_rows: int
    held_out_rows: int
    repeat_spread: float

    def as_markdown(self) -> str:
        lines = [f"held-out rows: {self.held_out_rows} (fit on {self.train_rows}); median repeat spread "
                 f"{100 * self.repeat_spread:.1f}%", "",
                 "| model | MAPE % | within 5% | within 10% | Spearman |", "| --- | --- | --- | --- | --- |"]
        for name, a in [("decoding estimator", self.estimator), ("tokens-only linear", self.baseline),
                        *[(f"  {s}", a) for s, a in self.per_strategy.items()]]:
            lines.append(f"| {name} | {a.mape:.1f} | {a.within_5:.0%} | {a.within_10:.0%} | {a.spearman:.3f} |")
        return "\n".join(lines)


def held_out_report(profile: dict, seed: int = 0) -> DecodingHeldOutReport:
    """Fit on the rows of non-held-out samples, score the held-out samples' rows."""
    hold = np.array([bool(r["holdout"]) for r in profile["rows"]])
    est = DecodingLatencyEstimator(profile, mask=~hold, seed=seed)
    rows = [r for r, h in zip(profile["rows"], hold) if h]
    configs = [_Knobs(**{k: r[k] for k in _Knobs.__annotations__}) for r in rows]
    counts = [(r["prompt_tokens"], r["new_tokens"]) for r in rows]
    acc = [r["accepted_per_pass"] if strategy(r["strategy"]).uses_draft else None for r in rows]
    measured = np.array([r["latency_ms"] for r in rows])
    predicted = est.predict(configs, [(*c, a) for c, a in zip(counts, acc)])
    per = {}
    for s in STRATEGY_NAMES:
        m = np.array([r["strategy"] == s for r in rows])
        if m.any():
            per[s] = accuracy(predicted[m], measured[m])
    spreads = [(max(r["latency_runs_ms"]) - min(r["latency_runs_ms"])) / r["latency_ms"] for r in profile["rows"]
               if len(r["latency_runs_ms"]) > 1]
    return DecodingHeldOutReport(accuracy(predicted, measured), accuracy(est.predict_baseline(configs, counts), measured),
                                 per, int((~hold).sum()), int(hold.sum()),
                                 float(np.median(spreads)) if spreads else float("nan"))


# ------------------------------------------------------------------------------------------------
# cache
# ------------------------------------------------------------------------------------------------
def decoding_cache_path(backend, cache_dir: str | Path | None = None) -> Path:
    """Where the decoding profile of ``backend`` on this device is cached."""
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    identity = backend.identity()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(identity.get("name", "decoding")))[:40]
    return directory / f"decoding-{name}-{cache_key(identity, device_fingerprint(backend.device))}.json"


def get_decoding_estimator(backend, cache_dir: str | Path | None = None, *, profile_if_missing: bool = True,
                           settings: DecodingProfileSettings = DecodingProfileSettings(),
                           progress: bool = True) -> DecodingLatencyEstimator:
    """The decoding estimator of ``backend`` on this device: profiled once, cached, refitted on load."""
    path = decoding_cache_path(backend, cache_dir)
    if path.exists():
        profile = read_checksummed_json(path)
        if profile.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{str(path)!r} holds a {profile.get('format')!r} profile; accepted: {PROFILE_FORMAT}")
        fingerprint = device_fingerprint(backend.device)
        if any(profile["device"].get(k) != fingerprint.get(k) for k in FINGERPRINT_KEYS_THAT_MATTER):
            raise ValueError(f"decoding profile {str(path)!r} was measured on another device; delete it to re-profile")
        speed.warn_if_shifted(profile["device"].get("speed_probe"), f"decoding of {backend.identity().get('name')}",
                              f"rm {path} and rerun", UserWarning)
        return DecodingLatencyEstimator(profile)
    if not profile_if_missing:
        raise FileNotFoundError(f"no decoding latency profile cached for {backend.identity().get('name')!r} on this "
                                f"device at {str(path)!r}; run `python bench/decoding.py` or pass profile_if_missing=True")
    profile, probe = speed.probed(lambda: profile_decoding(backend, settings, progress=progress))
    profile["device"] = {**profile["device"], "speed_probe": probe}  # how fast the machine was
    if speed.moved_during(probe):
        warnings.warn(f"decoding latency profile not cached: the machine's speed moved while it was measured "
                      f"({speed.describe(probe)}; other jobs started or stopped?); using it in this process only",
                      UserWarning, stacklevel=2)
        return DecodingLatencyEstimator(profile)
    write_checksummed_json(path, profile)
    return DecodingLatencyEstimator(read_checksummed_json(path))
