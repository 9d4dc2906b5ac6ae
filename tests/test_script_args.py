"""Every script's bad option is one line, exit 2, before any work (backends/script_args.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in [*REPO.glob("bench/*.py"), *REPO.glob("backends/**/*.py")]
                 if "ArgumentParser(" in p.read_text())


def test_every_script_parses_with_the_one_line_parser():
    assert len(SCRIPTS) >= 30
    plain = [str(p.relative_to(REPO)) for p in SCRIPTS if "argparse.ArgumentParser(" in p.read_text()
             and "class OneLineArgumentParser" not in p.read_text()]
    assert not plain, f"use backends.script_args.OneLineArgumentParser in {plain}"
    bare_counts = [f"{p.relative_to(REPO)}: {m}" for p in SCRIPTS
                   for m in re.findall(r'add_argument\("(--[a-z-]*(?:samples|repeats|tokens|steps|threads))"[^\n]*'
                                       r'type=int\b', p.read_text())]
    assert not bare_counts, f"counts parse with at_least(n): {bare_counts}"


@pytest.mark.parametrize("module, args, says", [
    ("bench.kv_policies", ["--repeats", "0"], "argument --repeats: '0' is invalid; accepted: an integer >= 1"),
    ("bench.kv_storage", ["--tokens", "1"], "argument --tokens: '1' is invalid; accepted: an integer >= 2"),
    ("bench.scale", ["--samples", "x"], "argument --samples: 'x' is invalid; accepted: an integer >= 1"),
    ("backends.tiny_text.train_v2", ["--bogus"], "unrecognized arguments: --bogus"),
    ("bench.kv_decode_step", ["--model", "/no/such/model"], "argument --model: '/no/such/model' is not a folder"),
    ("bench.tiny_latency", ["--model", "bench"], "argument --model: 'bench' has no config.json"),
])
def test_a_bad_option_is_one_line_and_exit_2(module, args, says):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and says in lines[0] and f"python -m {module} --help" in lines[0]
