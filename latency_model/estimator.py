"""The latency estimator: regressors over the cost features, method selection, and the saved file.

Methods (all predict milliseconds from the :mod:`latency_model.features` rows):

- ``analytic_gbt``: a non-negative linear model on the analytic cost terms, fitted for relative
  error, times ``exp`` of a gradient-boosted correction learned on all features. The linear part
  carries the extrapolation to unseen input sizes; the trees fix what the cost terms miss (cache
  effects, thread scheduling, kernel choice) and stay bounded outside the data.
- ``gbt``: gradient-boosted trees on log-latency over all features (no analytic prior).
- ``analytic``: the non-negative linear model alone.
- ``flops_linear``: ``a + b * total FLOPs`` (the baseline every report shows).

``method="auto"`` (the default) applies :data:`SELECTION_RULE` (:func:`select_method`): the
method with the lowest error on a validation fold of the fitting rows, so the report's starred
method and the cached estimator's method are the same and chosen by a stated rule.

File format (``save`` / ``load``): checksummed JSON (:func:`backends.io.write_checksummed_json`)
holding the fitted coefficients and tree arrays, the device fingerprint, the backend identity, the
checksum and row count of the profile it was fitted on, and that profile's noise. Nothing is
pickled; a truncated, edited or foreign file is an :class:`EstimatorFileError` naming the file.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from backends.io import CorruptFileError, read_checksummed_json, write_checksummed_json
from backends.knobs import KnobConfig
from latency_model.features import FEATURE_NAMES, STAGE1_FEATURE_NAMES, CostFeatures
from latency_model.profile import (FINGERPRINT_KEYS_THAT_MATTER, ProfileData, ProfileNoise, identity_key,
                                   knob_space_from_dict)

# scipy and scikit-learn only fit estimators, so they are imported where a fit happens: a process
# that reads a saved estimator (every env, every vector-env worker) does without them.
if TYPE_CHECKING:
    from sklearn.ensemble import GradientBoostingRegressor

ESTIMATOR_FORMAT = "knobgym-latency-estimator/2"
METHODS = ("analytic_gbt", "gbt", "analytic", "flops_linear")
CANDIDATES = ("analytic_gbt", "gbt", "analytic")  # what "auto" chooses among; flops_linear is the baseline
AUTO = "auto"
DEFAULT_METHOD = "analytic_gbt"  # used when a profile is too small to hold a validation fold
VALIDATION_FRACTION = 0.2
SELECTION_RULE = ("lowest MAPE on a validation fold among analytic_gbt, gbt and analytic (flops_linear is the "
                  "baseline): a seeded 20% of the fitting rows' configurations is held out, each method is "
                  "fitted on the rest and scored on it")
MIN_MS = 1e-3  # predictions are clamped here: a latency is never <= 0

# Analytic cost terms a linear latency model is built on (plus a constant).
TOTAL_ANALYTIC_COLUMNS = ("vision_flops", "prefill_linear_flops", "prefill_attention_flops", "prefill_expert_calls",
                          "prefill_active_experts", "decode_linear_flops", "decode_attention_flops",
                          "decode_expert_calls", "block_calls", "new_tokens", "lm_head_flops",
                          "weight_elements_read")
STAGE1_ANALYTIC_COLUMNS = ("vision_flops", "block1_linear_flops", "block1_attention_flops", "block1_expert_calls",
                           "block1_active_experts", "vision_tokens", "prefill_tokens")


class EstimatorFileError(CorruptFileError):
    """An estimator file that cannot be used (missing, not one, truncated, edited, other format)."""


class EstimatorMismatchWarning(UserWarning):
    """An estimator fitted on another device or backend than the one it is used for."""


def package_version() -> str:
    try:
        return metadata.version("knobgym")
    except metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# Regressors: fitted with numpy / scipy / scikit-learn, stored and evaluated as plain arrays
# --------------------------------------------------------------------------------------------
def _sum_columns(design: np.ndarray, coef: np.ndarray) -> np.ndarray:
    # Accumulated column by column in a fixed order: the result for a row must not depend on how
    # many rows are predicted with it (a GRPO group and separate episodes must get bit-identical
    # rewards). Neither a BLAS product nor ``sum(axis=1)`` guarantees that: numpy sums a single
    # row pairwise but a block of rows column-wise.
    total = np.zeros(len(design))
    for column, c in zip(design.T, coef):
        total += column * c
    return total


class AnalyticModel:
    """Non-negative least squares on analytic columns (plus a constant), minimising relative error."""

    kind = "analytic"

    def __init__(self, names: Sequence[str], columns: Sequence[str]):
        self.index = [list(names).index(c) for c in columns]
        self.columns = tuple(columns)
        self.coef = np.zeros(len(columns) + 1)

    def _design(self, X: np.ndarray) -> np.ndarray:
        return np.column_stack([np.ones(len(X)), X[:, self.index]])

    def fit(self, X: np.ndarray, y: np.ndarray) -> "AnalyticModel":
        A = self._design(X)
        scale = np.abs(A).max(axis=0)
        scale[scale == 0] = 1.0
        from scipy.optimize import nnls

        # Dividing each row by y turns squared error into squared relative error.
        coef, _ = nnls((A / scale) / y[:, None], np.ones(len(y)), maxiter=50 * A.shape[1])
        self.coef = coef / scale
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.maximum(_sum_columns(self._design(X), self.coef), MIN_MS)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "columns": list(self.columns), "coef": self.coef.tolist()}

    @classmethod
    def from_dict(cls, d: dict, names: Sequence[str]) -> "AnalyticModel":
        model = cls(names, d["columns"])
        model.coef = np.asarray(d["coef"], np.float64)
        if model.coef.shape != (len(model.columns) + 1,):
            raise ValueError(f"analytic model has {model.coef.shape} coefficients for {len(model.columns)} columns")
        return model


def _float32_at_most(value: float) -> np.float32:
    """The largest float32 <= ``value``: for a float32 ``x``, ``x <= value`` iff ``x <= _float32_at_most(value)``."""
    rounded = np.float32(value)
    return np.nextafter(rounded, np.float32(-np.inf)) if rounded > value else rounded


class BoostedTrees:
    """A fitted gradient-boosted tree ensemble as arrays (evaluated with numpy, stored as JSON).

    ``predict(X) = init + learning_rate * sum_t leaf_t(X)``. Every tree is stored as a complete
    binary tree of ``depth`` levels in heap order (node ``h`` has children ``2h+1`` and ``2h+2``;
    a leaf above the last level is copied down, its splits never taken): ``feature`` and
    ``threshold`` are ``[trees, 2**depth - 1]``, ``leaf`` is ``[trees, 2**depth]``. A row goes
    right when ``x[feature] > threshold`` with ``x`` rounded to float32, exactly as scikit-learn
    decides (thresholds are stored as the largest float32 not above scikit-learn's). The sum runs
    tree by tree in a fixed order, so a row's result does not depend on the batch around it.
    """

    def __init__(self, init: float, learning_rate: float, feature: np.ndarray, threshold: np.ndarray,
                 leaf: np.ndarray):
        self.init, self.learning_rate = float(init), float(learning_rate)
        self.feature = np.asarray(feature, np.int64)
        self.threshold = np.asarray(threshold, np.float32)
        self.leaf = np.asarray(leaf, np.float64)
        trees, inner = self.feature.shape if self.feature.ndim == 2 else (0, 0)
        self.depth = int(np.log2(inner + 1)) if inner else 0
        if (not trees or 2 ** self.depth - 1 != inner or self.threshold.shape != self.feature.shape
                or self.leaf.shape != (trees, 2 ** self.depth) or self.feature.min() < 0):
            raise ValueError(f"tree arrays of shapes {self.feature.shape}, {self.threshold.shape}, "
                             f"{self.leaf.shape} are not complete trees")
        self._inner_offset = (np.arange(trees) * inner)[None, :]
        self._leaf_offset = (np.arange(trees) * 2 ** self.depth)[None, :]

    @classmethod
    def from_sklearn(cls, model: GradientBoostingRegressor) -> "BoostedTrees":
        estimators = [est.tree_ for est in model.estimators_[:, 0]]
        depth = max(1, max(t.max_depth for t in estimators))
        inner = 2 ** depth - 1
        feature = np.zeros((len(estimators), inner), np.int64)
        threshold = np.full((len(estimators), inner), np.inf, np.float32)
        leaf = np.zeros((len(estimators), 2 ** depth))
        for i, t in enumerate(estimators):
            stack = [(0, 0)]  # (sklearn node, heap position)
            while stack:
                node, h = stack.pop()
                if h >= inner:  # a leaf on the last level
                    leaf[i, h - inner] = t.value[node].ravel()[0]
                elif t.children_left[node] < 0:  # a leaf above it: both children are the same leaf
                    stack += [(node, 2 * h + 1), (node, 2 * h + 2)]
                else:
                    feature[i, h], threshold[i, h] = t.feature[node], _float32_at_most(t.threshold[node])
                    stack += [(t.children_left[node], 2 * h + 1), (t.children_right[node], 2 * h + 2)]
        return cls(float(np.asarray(model.init_.constant_).ravel()[0]), model.learning_rate, feature, threshold,
                   leaf)

    def predict(self, X: np.ndarray) -> np.ndarray:
        X32 = np.ascontiguousarray(X, dtype=np.float32)
        n, width = X32.shape
        flat, row_offset = X32.ravel(), (np.arange(n) * width)[:, None]
        features, thresholds = self.feature.ravel(), self.threshold.ravel()
        k = (X32[:, self.feature[:, 0]] > self.threshold[:, 0]).astype(np.int64)  # position within a level
        for level in range(1, self.depth):
            h = self._inner_offset + (2 ** level - 1) + k
            k = 2 * k + (flat[row_offset + features[h]] > thresholds[h])
        values = np.ascontiguousarray(self.leaf.ravel()[self._leaf_offset + k].T)
        raw = np.full(n, self.init)
        for row in values:
            raw += self.learning_rate * row
        return raw

    def to_dict(self) -> dict:
        # Thresholds of the splits a copied-down leaf never takes are +inf, which JSON cannot hold:
        # they are stored as null.
        threshold = [[None if np.isinf(v) else float(v) for v in row] for row in self.threshold]
        return {"init": self.init, "learning_rate": self.learning_rate, "feature": self.feature.tolist(),
                "threshold": threshold, "leaf": self.leaf.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "BoostedTrees":
        threshold = np.array([[np.inf if v is None else v for v in row] for row in d["threshold"]], np.float64)
        return cls(d["init"], d["learning_rate"], np.asarray(d["feature"]), threshold.astype(np.float32),
                   np.asarray(d["leaf"]))


def _fit_trees(X: np.ndarray, target: np.ndarray, seed: int) -> BoostedTrees:
    # Small profiles (a few hundred rows): shallow trees, shrinkage and Huber loss so that one
    # point hit by a burst of load from other processes does not bend the fit. The tree count
    # bounds prediction cost (BENCHMARKS.md: prediction speed).
    from sklearn.ensemble import GradientBoostingRegressor

    model = GradientBoostingRegressor(loss="huber", n_estimators=100, max_depth=3, learning_rate=0.1,
                                      subsample=0.8, min_samples_leaf=3, random_state=seed)
    return BoostedTrees.from_sklearn(model.fit(X, target))


class TreeModel:
    """Gradient-boosted trees on log-latency over all features."""

    kind = "gbt"

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.trees: BoostedTrees | None = None

    def fit(self, X: np.ndarray, y: np.ndarray) -> "TreeModel":
        self.trees = _fit_trees(X, np.log(y), self.seed)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.maximum(np.exp(self.trees.predict(X)), MIN_MS)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "trees": self.trees.to_dict()}

    @classmethod
    def from_dict(cls, d: dict, names: Sequence[str]) -> "TreeModel":
        model = cls()
        model.trees = BoostedTrees.from_dict(d["trees"])
        return model


class AnalyticTreeModel:
    """:class:`AnalyticModel` times ``exp`` of boosted trees fitted to the log residual."""

    kind = "analytic_gbt"

    def __init__(self, names: Sequence[str], columns: Sequence[str], seed: int = 0):
        self.base = AnalyticModel(names, columns)
        self.seed = seed
        self.trees: BoostedTrees | None = None

    def fit(self, X: np.ndarray, y: np.ndarray) -> "AnalyticTreeModel":
        self.base.fit(X, y)
        self.trees = _fit_trees(X, np.log(y) - np.log(self.base.predict(X)), self.seed)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.maximum(self.base.predict(X) * np.exp(self.trees.predict(X)), MIN_MS)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "base": self.base.to_dict(), "trees": self.trees.to_dict()}

    @classmethod
    def from_dict(cls, d: dict, names: Sequence[str]) -> "AnalyticTreeModel":
        model = cls(names, d["base"]["columns"])
        model.base = AnalyticModel.from_dict(d["base"], names)
        model.trees = BoostedTrees.from_dict(d["trees"])
        return model


class FlopsLinearModel:
    """Ordinary least squares ``ms = a + b * total_flops``: the FLOPs-only baseline."""

    kind = "flops_linear"

    def __init__(self, names: Sequence[str]):
        self.index = list(names).index("total_flops")
        self.coef = np.zeros(2)

    def fit(self, X: np.ndarray, y: np.ndarray) -> "FlopsLinearModel":
        A = np.column_stack([np.ones(len(X)), X[:, self.index]])
        self.coef = np.linalg.lstsq(A, y, rcond=None)[0]
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.maximum(self.coef[0] + self.coef[1] * X[:, self.index], MIN_MS)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "coef": self.coef.tolist()}

    @classmethod
    def from_dict(cls, d: dict, names: Sequence[str]) -> "FlopsLinearModel":
        model = cls(names)
        model.coef = np.asarray(d["coef"], np.float64).reshape(2)
        return model


_REGRESSORS = {cls.kind: cls for cls in (AnalyticModel, TreeModel, AnalyticTreeModel, FlopsLinearModel)}


def make_regressor(method: str, stage: str = "total", seed: int = 0):
    """An unfitted regressor of ``method`` for whole runs (``total``) or ``stage1``."""
    names, analytic = ((FEATURE_NAMES, TOTAL_ANALYTIC_COLUMNS) if stage == "total"
                       else (STAGE1_FEATURE_NAMES, STAGE1_ANALYTIC_COLUMNS))
    if method == "analytic_gbt":
        return AnalyticTreeModel(names, analytic, seed)
    if method == "gbt":
        return TreeModel(seed)
    if method == "analytic":
        return AnalyticModel(names, analytic)
    if method == "flops_linear":
        return FlopsLinearModel(names)
    raise ValueError(f"method={method!r} is invalid; accepted: {', '.join(METHODS)}")


def regressor_from_dict(d: dict, stage: str):
    names = FEATURE_NAMES if stage == "total" else STAGE1_FEATURE_NAMES
    if not isinstance(d, dict) or d.get("kind") not in _REGRESSORS:
        raise ValueError(f"unknown regressor kind {d.get('kind') if isinstance(d, dict) else d!r}")
    return _REGRESSORS[d["kind"]].from_dict(d, names)


# --------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------
@dataclass
class LatencyEstimator:
    """Per-sample latency in milliseconds of (knob configuration, token counts) on one device.

    Attributes:
        features: the feature builder of the backend's model.
        total: regressor for a whole run (stage 1 + stage 2 + decoding).
        stage1: regressor for stage 1 alone, or ``None`` if the profile had no stage-1 times.
        method: the method name (:data:`METHODS`).
        fingerprint: the device it was fitted on (:func:`latency_model.profile.device_fingerprint`).
        identity: the backend identity it was fitted for.
        profile_sha256: checksum of the profile file it was fitted on (``None``: never written).
        profile_rows: rows of that profile it was fitted on.
        noise: that profile's measurement noise and its bound (:class:`ProfileNoise`): what envs
            and run reports show next to estimated latencies. ``noise.exceeds`` marks an estimator
            fitted on a noisy profile (such an estimator is never cached).
        selection: how ``method`` was chosen (rule, validation MAPE per method), or ``{}``.
        package_version: knobgym version that fitted it.
        info: other training facts (profile file, settings).
    """

    features: CostFeatures
    total: Any
    stage1: Any
    method: str
    fingerprint: dict
    identity: dict
    profile_sha256: str | None = None
    profile_rows: int = 0
    noise: ProfileNoise | None = None
    selection: dict = field(default_factory=dict)
    package_version: str = field(default_factory=package_version)
    info: dict = field(default_factory=dict)

    @property
    def noise_pct(self) -> float | None:
        """The profile's repeat noise in % (``noise.spread_pct``), ``None`` when unknown."""
        return None if self.noise is None else self.noise.spread_pct

    def predict(self, configs: Sequence[KnobConfig], token_counts) -> np.ndarray:
        """Latency (ms, float64 ``[N]``) of each run; ``token_counts`` as TokenCounts or an ``[N, 4]`` array."""
        return _predict(self.total, self.features.compute(configs, token_counts))

    def predict_stage1(self, tiers: Sequence, token_counts) -> np.ndarray:
        """Stage-1 latency (ms, ``[N]``) for tier names (or KnobConfigs) and stage-1 token counts."""
        if self.stage1 is None:
            raise ValueError("this estimator has no stage-1 model: its profile had no stage-1 times "
                             "(Outcome.stage1_ms was 0); accepted: an estimator fitted on a two-stage backend")
        return _predict(self.stage1, self.features.compute_stage1(tiers, token_counts))

    # --- files ------------------------------------------------------------------------------
    def as_dict(self) -> dict:
        return {"format": ESTIMATOR_FORMAT, "package_version": self.package_version, "method": self.method,
                "fingerprint": self.fingerprint, "identity": self.identity, "profile_sha256": self.profile_sha256,
                "profile_rows": self.profile_rows, "noise": None if self.noise is None else self.noise.as_dict(),
                "selection": self.selection, "info": self.info,
                "features": {"knob_space": self.features.knob_space.as_dict(),
                             "cost_params": dict(self.features.cost_params)},
                "total": self.total.to_dict(), "stage1": None if self.stage1 is None else self.stage1.to_dict()}

    def save(self, path: str | Path) -> Path:
        """Write the estimator to ``path`` atomically as checksummed JSON."""
        return write_checksummed_json(path, json.loads(json.dumps(self.as_dict(), default=str)))

    @classmethod
    def load(cls, path: str | Path, *, expect_fingerprint: dict | None = None,
             expect_identity: dict | None = None) -> "LatencyEstimator":
        """Read and validate an estimator; warn (:class:`EstimatorMismatchWarning`) if it was fitted elsewhere.

        Raises:
            EstimatorFileError: the file is missing, not an estimator, truncated, edited, or of
                another format (the message names the file).
        """
        path = Path(path)
        try:
            d = read_checksummed_json(path)
        except CorruptFileError as exc:
            raise EstimatorFileError(path, f"latency estimator {str(exc).split(': ', 1)[-1]}") from None
        if not isinstance(d, dict) or d.get("format") != ESTIMATOR_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise EstimatorFileError(path, f"latency estimator format {got!r}; accepted: {ESTIMATOR_FORMAT} "
                                           f"(refit with `python -m latency_model fit backend=... force=true`)")
        try:
            features = CostFeatures(knob_space_from_dict(d["features"]["knob_space"]),
                                    dict(d["features"]["cost_params"]))
            estimator = cls(features=features, total=regressor_from_dict(d["total"], "total"),
                            stage1=None if d["stage1"] is None else regressor_from_dict(d["stage1"], "stage1"),
                            method=str(d["method"]), fingerprint=dict(d["fingerprint"]), identity=dict(d["identity"]),
                            profile_sha256=d["profile_sha256"], profile_rows=int(d["profile_rows"]),
                            noise=None if d["noise"] is None else ProfileNoise.from_dict(d["noise"]),
                            selection=dict(d["selection"]), package_version=str(d["package_version"]),
                            info=dict(d["info"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EstimatorFileError(path, f"incomplete latency estimator ({type(exc).__name__}: {exc})") from None
        problems = mismatches(estimator, expect_fingerprint, expect_identity)
        if problems:
            warnings.warn(f"latency estimator {str(path)!r} was fitted elsewhere: {'; '.join(problems)}. Its "
                          f"predictions describe that device/backend, not this one; re-profile with "
                          f"`python -m latency_model profile backend=... force=true`", EstimatorMismatchWarning,
                          stacklevel=2)
        return estimator


def _predict(model, X: np.ndarray) -> np.ndarray:
    # An empty batch simply has no latencies.
    return np.asarray(model.predict(X), dtype=np.float64) if len(X) else np.zeros(0)


def mismatches(estimator: LatencyEstimator, fingerprint: dict | None, identity: dict | None) -> list[str]:
    """Human-readable differences between where ``estimator`` was fitted and the expected device/backend.

    Backend identities are compared on :func:`~latency_model.profile.identity_key` (paths left out).
    """
    problems = []
    if fingerprint is not None:
        for key in FINGERPRINT_KEYS_THAT_MATTER:
            have, want = estimator.fingerprint.get(key), fingerprint.get(key)
            if have != want:
                problems.append(f"device {key} {have!r} != {want!r}")
    if identity is not None:
        have, want = identity_key(estimator.identity), identity_key(identity)
        diff = [k for k in sorted(set(have) | set(want)) if _canonical(have.get(k)) != _canonical(want.get(k))]
        if diff:
            problems.append("backend " + ", ".join(f"{k} {have.get(k)!r} != {want.get(k)!r}" for k in diff))
    return problems


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------
# Fitting and method selection
# --------------------------------------------------------------------------------------------
def fit_regressors(profile: ProfileData, mask: np.ndarray | None = None, method: str = DEFAULT_METHOD,
                   seed: int = 0) -> tuple[CostFeatures, Any, Any]:
    """Fit the whole-run and stage-1 regressors of ``method`` on the rows of ``profile`` in ``mask``."""
    features = CostFeatures(profile.knob_space, profile.cost_params)
    y = profile.column("latency_ms", mask).astype(np.float64)
    if len(y) < 2:
        raise ValueError(f"cannot fit a latency estimator on {len(y)} rows; accepted: a profile with >= 2 rows")
    if not (np.isfinite(y).all() and (y > 0).all()):
        raise ValueError("profile latencies must be finite and > 0 to fit an estimator")
    X = features.compute(profile.configs(mask), profile.token_counts(mask))
    total = make_regressor(method, "total", seed).fit(X, y)
    stage1 = None
    y1 = profile.column("stage1_ms", mask).astype(np.float64)
    if (y1 > 0).all():
        X1 = features.compute_stage1([c.tier for c in profile.configs(mask)], profile.token_counts(mask))
        stage1 = make_regressor(method, "stage1", seed).fit(X1, y1)
    return features, total, stage1


def select_method(profile: ProfileData, mask: np.ndarray | None = None, methods: Sequence[str] = METHODS,
                  seed: int = 0, candidates: Sequence[str] = CANDIDATES) -> dict:
    """Apply :data:`SELECTION_RULE` to the rows of ``profile`` in ``mask`` (default: the rows the
    profile design did not hold out, so the held-out rows stay unseen by the choice).

    Every method of ``methods`` is scored (the report shows them all); the choice is among those
    also in ``candidates``. Returns ``{"rule", "chosen", "validation_mape_pct": {method: %},
    "validation_rows", "fit_rows"}``;
    with fewer than two configurations or rows on either side it chooses :data:`DEFAULT_METHOD`
    and says so in ``rule``.
    """
    if mask is None:
        holdout = profile.holdout
        mask = ~holdout if holdout.any() and not holdout.all() else np.ones(len(profile), bool)
    mask = np.asarray(mask, bool)
    configs = profile.configs()
    keys = sorted({(str(c.tier), c.token_budget, c.top_k or 0, c.depth or 0)
                   for c, keep in zip(configs, mask) if keep})
    rng = np.random.default_rng(seed)
    n_val = int(round(VALIDATION_FRACTION * len(keys)))
    val_keys = {keys[i] for i in rng.permutation(len(keys))[:n_val]}
    in_val = np.array([(str(c.tier), c.token_budget, c.top_k or 0, c.depth or 0) in val_keys for c in configs])
    val_mask, fit_mask = mask & in_val, mask & ~in_val
    if val_mask.sum() < 2 or fit_mask.sum() < 2:
        return {"rule": f"default {DEFAULT_METHOD}: too few rows for a validation fold", "chosen": DEFAULT_METHOD,
                "validation_mape_pct": {}, "validation_rows": int(val_mask.sum()), "fit_rows": int(fit_mask.sum())}
    measured = profile.column("latency_ms", val_mask).astype(np.float64)
    X_val_configs, X_val_counts = profile.configs(val_mask), profile.token_counts(val_mask)
    scores = {}
    for method in methods:
        features, model, _ = fit_regressors(profile, fit_mask, method, seed)
        predicted = model.predict(features.compute(X_val_configs, X_val_counts))
        scores[method] = float(100 * np.mean(np.abs(predicted - measured) / measured))
    eligible = [m for m in methods if m in candidates] or list(methods)
    chosen = min(eligible, key=lambda m: (scores[m], eligible.index(m)))
    return {"rule": SELECTION_RULE, "chosen": chosen, "validation_mape_pct": scores,
            "validation_rows": int(val_mask.sum()), "fit_rows": int(fit_mask.sum())}


def fit_estimator(profile: ProfileData, method: str = AUTO, *, mask: np.ndarray | None = None,
                  seed: int = 0, source: str | None = None) -> LatencyEstimator:
    """Fit a :class:`LatencyEstimator` on ``profile`` (all rows unless ``mask`` says otherwise).

    ``method="auto"`` chooses by :func:`select_method` (then fits the chosen method on all rows);
    a method name from :data:`METHODS` is used as given.
    """
    if method == AUTO:
        selection = select_method(profile, seed=seed)
        method = selection["chosen"]
    elif method in METHODS:
        selection = {"rule": "given", "chosen": method}
    else:
        raise ValueError(f"method={method!r} is invalid; accepted: {AUTO}, {', '.join(METHODS)}")
    features, total, stage1 = fit_regressors(profile, mask, method, seed)
    rows = len(profile) if mask is None else int(np.sum(mask))
    return LatencyEstimator(features=features, total=total, stage1=stage1, method=method,
                            fingerprint=dict(profile.device), identity=dict(profile.backend),
                            profile_sha256=profile.sha256, profile_rows=rows, noise=profile.noise,
                            selection=selection, info={"profile": source, "settings": profile.settings})
