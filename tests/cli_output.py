"""What a failed CLI command printed, less its status lines.

Before it fails, a command may already have said what it is doing: the phase messages and plain
progress lines of :mod:`knobgym_cli.progress` (``<phase>...``, ``<phase>: done in 0:05``,
``<phase>: 3/5 agents in 0:12``), the budget lines of :mod:`knobgym_cli.budgets` and the run
folder, and transformers' ``Loading weights`` bar. :func:`failure_lines` drops exactly those, so a
test can assert that the failure itself is one ``error:`` line with no traceback.
"""

from __future__ import annotations

import re

STATUS = re.compile(r"Loading weights|\.\.\.$|: done in \d+:\d\d$|: \d+/\d+ \w+ in \d+:\d\d( \(.*\))?$"
                    r"|^achievable latency on this device |^budgets=auto: |^budget=auto -> |^run folder: ")


def failure_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not status lines."""
    return [line for line in stderr.strip().splitlines() if not STATUS.search(line)]
