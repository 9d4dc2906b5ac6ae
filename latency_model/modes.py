"""Where an env's latency figure comes from: the one list every env validates against.

- ``estimated``: the per-device latency estimator's prediction (deterministic across processes);
- ``measured``: the wall-clock time of the run itself (nondeterministic).
"""

LATENCY_MODES = ("estimated", "measured")
