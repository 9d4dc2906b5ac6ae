"""Same seeds, same report rows: one short seeded run of each env family at a reference commit and here.

    python -m bench.same_rows [--ref main] [--keep DIR]

Exports ``--ref`` (``git archive``: no worktree, nothing written to the repository) and this
working tree's files, runs in each ``train.py`` with the same tiny settings on ``MultiKnob-v0``,
``TokenBudget-v0``, ``KV-SinkWindow-v0`` and ``Decoding-v0`` (tiny backends, seed 0, one or two
updates), and prints, per env, whether every row of ``report.json`` is the same. Latency is
deterministic on both sides: the vision envs use the analytic stand-in of ``tests/fake_latency.py``,
the KV env fixed TPOT coefficients, and ``Decoding-v0`` one short decoding profile measured once
here and read by both sides from one ``KNOBGYM_CACHE``. Run-dependent columns (timings, paths) are
left out of the comparison. Exit status 1 when any row differs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backends.script_args import OneLineArgumentParser  # noqa: E402  (after the path insert: run as a file)

COMMON = ["agent.total_updates=2", "agent.batch_size=2", "agent.num_generations=4", "eval.every=1",
          "eval.num_samples=6", "eval.validation_samples=4", "baselines.static.calibration_samples=2",
          "baselines.bandit.rounds=8", "seed=0"]
RUNS = {
    "MultiKnob-v0": ["env=MultiKnob-v0", "estimator=fake_latency:make", "budget=80ms"],
    "TokenBudget-v0": ["env=TokenBudget-v0", "estimator=fake_latency:make", "budget=80ms"],
    "KV-SinkWindow-v0": ["env=KV-SinkWindow-v0", "env.kwargs.episode_tokens=32", "env.kwargs.chunk_tokens=8",
                         "+env.kwargs.tpot_model={base_ms:2.0,per_slot_ms:0.02,per_prune_ms:0.5}", "budget=2.5ms",
                         "eval.baselines=[oracle,static,greedy,random]"],
    "Decoding-v0": ["env=Decoding-v0", "budget=30ms", "eval.baselines=[oracle,static,greedy,random]"],
}
VOLATILE = {"seconds", "wall_s", "time_s", "elapsed_s", "checkpoint", "path"}


def export(ref: str, dest: Path) -> Path:
    """The tracked files of ``ref`` (a commit) under ``dest``."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref], check=True,
                          capture_output=True).stdout
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def seed_decoding_cache(cache: Path) -> None:
    """One short decoding profile of the shipped tiny pair, cached even when the machine's speed moved
    while it was measured (both sides must read the same profile; its accuracy does not matter)."""
    code = ("import sys\n"
            "from backends.io import write_checksummed_json\n"
            "from backends.registry import load_backend\n"
            "from latency_model.decoding import DecodingProfileSettings, decoding_cache_path, profile_decoding\n"
            "pair = load_backend('decoding')\n"
            "profile = profile_decoding(pair, DecodingProfileSettings(samples=4, repeats=1, warmup=1))\n"
            "write_checksummed_json(decoding_cache_path(pair, sys.argv[1]), profile)\n")
    subprocess.run([sys.executable, "-c", code, str(cache / "latency")], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})


def rows(tree: Path, env_id: str, runs_dir: Path, cache: Path) -> list[dict]:
    """The report rows of one seeded run of ``env_id`` with the code under ``tree``."""
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'tests'}", "KNOBGYM_CACHE": str(cache)}
    result = subprocess.run([sys.executable, str(tree / "train.py"), *RUNS[env_id], *COMMON, f"runs_dir={runs_dir}"],
                            cwd=tree, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{env_id} failed under {tree}:\n{result.stderr[-3000:]}")
    (report,) = runs_dir.glob("*/*/*/report.json")
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in json.loads(report.read_text())["rows"]]


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", default="main", help="the reference commit (default: main)")
    parser.add_argument("--env", nargs="*", default=list(RUNS), choices=list(RUNS), help="env families to run")
    parser.add_argument("--keep", type=Path, default=None, help="keep the trees and run folders here")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="same-rows-")) if args.keep is None else args.keep
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard"], check=True,
                           capture_output=True, text=True).stdout.split()
    here = root / "here"
    for name in files:  # this working tree's files, committed or not
        if (REPO / name).is_file():
            (here / name).parent.mkdir(parents=True, exist_ok=True)
            (here / name).write_bytes((REPO / name).read_bytes())
    trees = {"ref": export(args.ref, root / "ref"), "here": here}
    cache = root / "cache"
    if "Decoding-v0" in args.env:
        seed_decoding_cache(cache)
    differ = 0
    for env_id in args.env:
        got = {side: rows(tree, env_id, root / "runs" / side / env_id, cache) for side, tree in trees.items()}
        same = got["ref"] == got["here"]
        differ += not same
        print(f"{env_id}: {len(got['here'])} rows, {'same' if same else 'DIFFERENT'} ({args.ref} vs this tree)")
        for a, b in zip(got["ref"], got["here"]):
            print(f"  {b.get('agent')} @ {b.get('budget_ms')}: {'=' if a == b else f'{a} != {b}'}")
    print(f"files under {root}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
