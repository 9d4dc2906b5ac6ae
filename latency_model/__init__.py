"""knobgym latency_model: a learned per-sample latency estimator for a backend on this device.

``get_estimator(backend)`` returns the cached estimator of (backend checkpoint, device), profiling
and fitting it once when missing; ``estimator.predict(configs, token_counts)`` gives milliseconds
per run, and ``estimator.noise`` (:class:`ProfileNoise`) how noisy the profile it was fitted on was.
Command line: ``python -m latency_model --help``.
"""

from latency_model.cache import NoisyProfileWarning, SpeedShiftWarning, cache_entry, default_cache_dir, get_estimator
from latency_model.estimator import (METHODS, SELECTION_RULE, EstimatorFileError, EstimatorMismatchWarning,
                                     LatencyEstimator, fit_estimator, select_method)
from latency_model.features import COST_PARAM_KEYS, FEATURE_NAMES, CostFeatures
from latency_model.modes import LATENCY_MODES
from latency_model.profile import (ProfileData, ProfileNoise, ProfileSettings, device_fingerprint, identity_key,
                                   profile_backend, read_profile)
from latency_model.report import held_out_report

__all__ = ["COST_PARAM_KEYS", "LATENCY_MODES", "FEATURE_NAMES", "METHODS", "SELECTION_RULE", "CostFeatures",
           "EstimatorFileError", "EstimatorMismatchWarning", "LatencyEstimator", "NoisyProfileWarning", "ProfileData",
           "ProfileNoise", "ProfileSettings", "SpeedShiftWarning", "cache_entry", "default_cache_dir", "device_fingerprint",
           "fit_estimator", "get_estimator", "held_out_report", "identity_key", "profile_backend", "read_profile",
           "select_method"]
