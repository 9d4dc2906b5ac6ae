"""knobgym latency_model: a learned per-sample latency estimator for a backend on this device.

``get_estimator(backend)`` returns the cached estimator of (backend, device), profiling and fitting
it once when missing; ``estimator.predict(configs, token_counts)`` gives milliseconds per run.
Command line: ``python -m latency_model profile|fit|report backend=tiny [key=value ...]``.
"""

from latency_model.cache import default_cache_dir, get_estimator
from latency_model.estimator import (METHODS, EstimatorFileError, EstimatorMismatchWarning, LatencyEstimator,
                                     fit_estimator)
from latency_model.modes import LATENCY_MODES
from latency_model.features import COST_PARAM_KEYS, FEATURE_NAMES, CostFeatures
from latency_model.profile import ProfileData, ProfileSettings, device_fingerprint, profile_backend, read_profile
from latency_model.report import held_out_report

__all__ = ["COST_PARAM_KEYS", "LATENCY_MODES", "FEATURE_NAMES", "METHODS", "CostFeatures", "EstimatorFileError",
           "EstimatorMismatchWarning", "LatencyEstimator", "ProfileData", "ProfileSettings", "default_cache_dir",
           "device_fingerprint", "fit_estimator", "get_estimator", "held_out_report", "profile_backend",
           "read_profile"]
