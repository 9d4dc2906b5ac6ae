"""The latency estimator: regressors over the cost features, and the saved, fingerprinted container.

Methods (all predict milliseconds from the :mod:`latency_model.features` rows):

- ``analytic_gbt`` (default): a non-negative linear model on the analytic cost terms, fitted for
  relative error, times ``exp`` of a gradient-boosted correction learned on all features. The
  linear part carries the extrapolation to unseen input sizes; the trees fix what the cost
  terms miss (cache effects, thread scheduling, kernel choice) and stay bounded outside the data.
- ``gbt``: gradient-boosted trees on log-latency over all features (no analytic prior).
- ``analytic``: the non-negative linear model alone.
- ``flops_linear``: ``a + b * total FLOPs`` (the baseline every report shows).

File format (``save`` / ``load``): one magic line, one JSON header line (format version, package
version, device fingerprint, backend identity, payload length and SHA-256), then the pickled
estimator. Loading checks all of it, so a truncated or corrupted file is an error naming the file.
Files are pickles: load only estimators you (or your cache) wrote.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.optimize import nnls
from sklearn.ensemble import GradientBoostingRegressor

from backends.knobs import KnobConfig
from latency_model.features import FEATURE_NAMES, STAGE1_FEATURE_NAMES, CostFeatures
from latency_model.profile import FINGERPRINT_KEYS_THAT_MATTER, ProfileData, atomic_write_bytes

FILE_MAGIC = b"KNOBGYM-LATENCY-ESTIMATOR\n"
FORMAT_VERSION = 1
METHODS = ("analytic_gbt", "gbt", "analytic", "flops_linear")
MIN_MS = 1e-3  # predictions are clamped here: a latency is never <= 0

# Analytic cost terms a linear latency model is built on (plus a constant).
TOTAL_ANALYTIC_COLUMNS = ("vision_flops", "prefill_linear_flops", "prefill_attention_flops", "prefill_expert_calls",
                          "prefill_active_experts", "decode_linear_flops", "decode_attention_flops",
                          "decode_expert_calls", "block_calls", "new_tokens", "lm_head_flops",
                          "weight_elements_read")
STAGE1_ANALYTIC_COLUMNS = ("vision_flops", "block1_linear_flops", "block1_attention_flops", "block1_expert_calls",
                           "block1_active_experts", "vision_tokens", "prefill_tokens")


class EstimatorFileError(ValueError):
    """An estimator file that cannot be used (not one, truncated, corrupted, newer format)."""


class EstimatorMismatchWarning(UserWarning):
    """An estimator fitted on another device or backend than the one it is used for."""


def package_version() -> str:
    try:
        return metadata.version("knobgym")
    except metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# Regressors
# --------------------------------------------------------------------------------------------
class AnalyticModel:
    """Non-negative least squares on analytic columns (plus a constant), minimising relative error."""

    def __init__(self, names: Sequence[str], columns: Sequence[str]):
        self.index = [list(names).index(c) for c in columns]
        self.columns = tuple(columns)

    def _design(self, X: np.ndarray) -> np.ndarray:
        return np.column_stack([np.ones(len(X)), X[:, self.index]])

    def fit(self, X: np.ndarray, y: np.ndarray) -> "AnalyticModel":
        A = self._design(X)
        scale = np.abs(A).max(axis=0)
        scale[scale == 0] = 1.0
        # Dividing each row by y turns squared error into squared relative error.
        coef, _ = nnls((A / scale) / y[:, None], np.ones(len(y)), maxiter=50 * A.shape[1])
        self.coef = coef / scale
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        # Accumulated column by column in a fixed order: the result for a row must not depend
        # on how many rows are predicted with it (a GRPO group and separate episodes must get
        # bit-identical rewards). Neither a BLAS product nor ``sum(axis=1)`` guarantees that:
        # numpy sums a single row pairwise but a block of rows column-wise.
        design = self._design(X)
        total = np.zeros(len(design))
        for column, coef in zip(design.T, self.coef):
            total += column * coef
        return np.maximum(total, MIN_MS)


def _trees(seed: int) -> GradientBoostingRegressor:
    # Small profiles (a few hundred rows): shallow trees, shrinkage and Huber loss so that one
    # point hit by a burst of load from other processes does not bend the fit.
    # 100 trees keep a 10,000-row predict well under 50 ms on one CPU core.
    return GradientBoostingRegressor(loss="huber", n_estimators=100, max_depth=3, learning_rate=0.1,
                                     subsample=0.8, min_samples_leaf=3, random_state=seed)


class TreeModel:
    """Gradient-boosted trees on log-latency over all features."""

    def __init__(self, seed: int = 0):
        self.trees = _trees(seed)

    def fit(self, X: np.ndarray, y: np.ndarray) -> "TreeModel":
        self.trees.fit(X, np.log(y))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.maximum(np.exp(self.trees.predict(X)), MIN_MS)


class AnalyticTreeModel:
    """:class:`AnalyticModel` times ``exp`` of boosted trees fitted to the log residual."""

    def __init__(self, names: Sequence[str], columns: Sequence[str], seed: int = 0):
        self.base = AnalyticModel(names, columns)
        self.trees = _trees(seed)

    def fit(self, X: np.ndarray, y: np.ndarray) -> "AnalyticTreeModel":
        self.base.fit(X, y)
        self.trees.fit(X, np.log(y) - np.log(self.base.predict(X)))
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.maximum(self.base.predict(X) * np.exp(self.trees.predict(X)), MIN_MS)


class FlopsLinearModel:
    """Ordinary least squares ``ms = a + b * total_flops``: the FLOPs-only baseline."""

    def __init__(self, names: Sequence[str]):
        self.index = list(names).index("total_flops")

    def fit(self, X: np.ndarray, y: np.ndarray) -> "FlopsLinearModel":
        A = np.column_stack([np.ones(len(X)), X[:, self.index]])
        self.coef = np.linalg.lstsq(A, y, rcond=None)[0]
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.maximum(self.coef[0] + self.coef[1] * X[:, self.index], MIN_MS)


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
        package_version: knobgym version that fitted it.
        info: training facts (rows, profile file, settings).
    """

    features: CostFeatures
    total: Any
    stage1: Any
    method: str
    fingerprint: dict
    identity: dict
    package_version: str = field(default_factory=package_version)
    info: dict = field(default_factory=dict)

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
    def save(self, path: str | Path) -> Path:
        """Write the estimator to ``path`` atomically (see the module docstring for the format)."""
        payload = pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)
        header = {"format_version": FORMAT_VERSION, "package_version": self.package_version,
                  "method": self.method, "fingerprint": self.fingerprint, "identity": self.identity,
                  "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest()}
        data = FILE_MAGIC + json.dumps(header, sort_keys=True, default=str).encode("utf-8") + b"\n" + payload
        path = Path(path)
        atomic_write_bytes(path, data)
        return path

    @classmethod
    def load(cls, path: str | Path, *, expect_fingerprint: dict | None = None,
             expect_identity: dict | None = None) -> "LatencyEstimator":
        """Read an estimator; warn (:class:`EstimatorMismatchWarning`) if it was fitted elsewhere.

        Raises:
            EstimatorFileError: the file is missing, not an estimator, truncated or corrupted
                (the message names the file).
        """
        path = Path(path)
        header, payload = read_header(path)
        try:
            estimator = pickle.loads(payload)
        except Exception as exc:  # unpickling can raise almost anything on a bad payload
            raise EstimatorFileError(f"latency estimator file {str(path)!r} is corrupted: cannot unpickle ({exc})") from None
        if not isinstance(estimator, cls):
            raise EstimatorFileError(f"latency estimator file {str(path)!r} holds a {type(estimator).__name__}, "
                                     f"not a LatencyEstimator")
        problems = mismatches(estimator, expect_fingerprint, expect_identity)
        if problems:
            warnings.warn(f"latency estimator {str(path)!r} was fitted elsewhere: {'; '.join(problems)}. Its "
                          f"predictions describe that device/backend, not this one; re-profile with "
                          f"`python -m latency_model fit backend=...`", EstimatorMismatchWarning, stacklevel=2)
        return estimator


def _predict(model, X: np.ndarray) -> np.ndarray:
    # scikit-learn refuses zero rows; an empty batch simply has no latencies.
    return np.asarray(model.predict(X), dtype=np.float64) if len(X) else np.zeros(0)


def read_header(path: Path) -> tuple[dict, bytes]:
    """Validated ``(header, payload)`` of an estimator file; :class:`EstimatorFileError` otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise EstimatorFileError(f"cannot read latency estimator file {str(path)!r}: {exc.strerror or exc}") from None
    if not data.startswith(FILE_MAGIC):
        what = "is empty" if not data else "is not a knobgym latency estimator (bad magic line)"
        raise EstimatorFileError(f"latency estimator file {str(path)!r} {what}; accepted: a file written by "
                                 f"LatencyEstimator.save")
    end = data.find(b"\n", len(FILE_MAGIC))
    if end < 0:
        raise EstimatorFileError(f"latency estimator file {str(path)!r} is truncated (header incomplete)")
    try:
        header = json.loads(data[len(FILE_MAGIC):end].decode("utf-8"))
        expected_bytes, expected_sha = int(header["payload_bytes"]), str(header["payload_sha256"])
        version = int(header["format_version"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise EstimatorFileError(f"latency estimator file {str(path)!r} is corrupted (unreadable header)") from None
    if version > FORMAT_VERSION:
        raise EstimatorFileError(f"latency estimator file {str(path)!r} has format version {version}; accepted: "
                                 f"<= {FORMAT_VERSION} (written by a newer knobgym {header.get('package_version')})")
    payload = data[end + 1:]
    if len(payload) < expected_bytes:
        raise EstimatorFileError(f"latency estimator file {str(path)!r} is truncated: {len(payload)} of "
                                 f"{expected_bytes} payload bytes")
    if len(payload) > expected_bytes or hashlib.sha256(payload).hexdigest() != expected_sha:
        raise EstimatorFileError(f"latency estimator file {str(path)!r} is corrupted (checksum mismatch)")
    return header, payload


def mismatches(estimator: LatencyEstimator, fingerprint: dict | None, identity: dict | None) -> list[str]:
    """Human-readable differences between where ``estimator`` was fitted and the expected device/backend."""
    problems = []
    if fingerprint is not None:
        for key in FINGERPRINT_KEYS_THAT_MATTER:
            have, want = estimator.fingerprint.get(key), fingerprint.get(key)
            if have != want:
                problems.append(f"device {key} {have!r} != {want!r}")
    if identity is not None and _canonical(estimator.identity) != _canonical(identity):
        keys = sorted(set(estimator.identity) | set(identity))
        diff = [k for k in keys if _canonical(estimator.identity.get(k)) != _canonical(identity.get(k))]
        problems.append("backend " + ", ".join(f"{k} {estimator.identity.get(k)!r} != {identity.get(k)!r}"
                                               for k in diff))
    return problems


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------
def fit_regressors(profile: ProfileData, mask: np.ndarray | None = None, method: str = "analytic_gbt",
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


def fit_estimator(profile: ProfileData, method: str = "analytic_gbt", *, mask: np.ndarray | None = None,
                  seed: int = 0, source: str | None = None) -> LatencyEstimator:
    """Fit a :class:`LatencyEstimator` on ``profile`` (all rows unless ``mask`` says otherwise)."""
    features, total, stage1 = fit_regressors(profile, mask, method, seed)
    rows = len(profile) if mask is None else int(np.sum(mask))
    return LatencyEstimator(features=features, total=total, stage1=stage1, method=method,
                            fingerprint=dict(profile.device), identity=dict(profile.backend),
                            info={"rows": rows, "profile": source, "settings": profile.settings})
