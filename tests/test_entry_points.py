"""Every door agrees: ``gym.make``, ``train.py``, async vector envs and the README's own code.

Each check runs what a user runs, in a fresh process (``subprocess`` with a time limit, so a hang
fails instead of blocking CI):

- ``gym.make`` and ``train.py`` on the same env and backend read one latency cache entry: the
  second never profiles (the thread count is one default, :mod:`backends.threads`);
- ``gymnasium.make_vec(id, 2, vectorization_mode="async")`` with the ``fork`` and ``spawn`` start
  methods, after the parent ran the env with two torch threads: reset and a step complete, for
  every registered id (one probe process runs them all);
- the piped output of the main job holds no progress-bar control characters;
- the README's code blocks marked ``<!-- test: runs on a CPU -->`` run without an error or an
  unexpected warning.

Latency profiles here are short (a stand-in ``ProfileSettings`` in the process that profiles) or
stand-in estimators (``fake_latency``), so the checks take seconds to a few minutes, not the real
profile's minutes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest

import envs

REPO = Path(__file__).resolve().parent.parent
#: what a terminal progress bar leaves in a piped log: carriage returns and ANSI escape sequences
CONTROL = re.compile(r"[\r\x1b]")
#: run before a user's code where a profile may be needed: a short profile (seconds), not the real one
SHORT_PROFILE = ("import functools, latency_model.cache as _c; from latency_model.profile import ProfileSettings as _P; "
                 "_c.ProfileSettings = functools.partial(_P, points=40, repeats=1, warmup=1, samples=8)\n")


def run(args: list[str], cwd: Path, cache: Path, timeout: float, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``args`` as a user runs them: a fresh process, output piped, the latency cache under ``cache``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "KNOBGYM_CACHE": str(cache),
           "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "always"}
    return subprocess.run(args, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)


def cache_state(cache: Path) -> dict[str, tuple[int, int]]:
    """Every file under the latency cache with its modification time and size."""
    return {str(p.relative_to(cache)): (p.stat().st_mtime_ns, p.stat().st_size) for p in cache.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------
# one latency cache for gym.make and train.py; no progress-bar states in the piped main job
# ------------------------------------------------------------------------------------------------
GYM_MAKE_HF = SHORT_PROFILE + """
import sys
import gymnasium as gym
import envs

env = gym.make("MultiKnob-v0", budget="auto",
               backend={"name": "hf", "model": sys.argv[1], "dataset": sys.argv[2], "generation": {"max_new_tokens": 2}})
env.reset(seed=0)
env.step(env.action_space.sample())
"""


def test_gym_make_and_train_py_read_one_latency_cache_and_pipe_clean_output(tmp_path, random_tiny_checkpoint):
    from backends.tiny.export_dataset import export_dataset

    data = export_dataset(tmp_path / "data", n=40)
    cache = tmp_path / "cache"
    first = run([sys.executable, "-c", GYM_MAKE_HF, str(random_tiny_checkpoint), str(data)], tmp_path, cache, 600)
    assert first.returncode == 0, first.stderr[-3000:]
    profiled = cache_state(cache)
    assert [name for name in profiled if name.endswith(".estimator")], "gym.make did not cache an estimator"

    # train.py (no estimator=: the cached one) on the same env and backend, output piped like a log
    args = ["env=MultiKnob-v0", "backend=hf", f"backend.model={random_tiny_checkpoint}", f"backend.dataset={data}",
            "backend.generation={max_new_tokens:2}", "budget=auto", "agent.total_updates=1", "agent.batch_size=2",
            "agent.num_generations=4", "eval.every=1", "eval.num_samples=2", "eval.validation_samples=96",
            "baselines.static.calibration_samples=1", "baselines.bandit.rounds=4"]
    trained = run([sys.executable, str(REPO / "train.py"), *args], tmp_path, cache, 900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert cache_state(cache) == profiled, "train.py profiled again instead of reading gym.make's cache entry"
    assert "profiling" not in trained.stdout + trained.stderr
    assert not CONTROL.search(trained.stdout + trained.stderr), "progress-bar control characters in piped output"
    for line in (trained.stdout + trained.stderr).splitlines():
        assert "Loading weights" not in line and "Generating" not in line, line
    # 96 validation samples asked of a 40-sample dataset's small split: said once, not silently capped
    output = trained.stdout + trained.stderr
    capped = [line for line in output.splitlines() if "eval.validation_samples=96: the validation split has" in line]
    assert len(capped) == 1, output[-3000:]

    # and gym.make after the CLI reads the same entry too
    again = run([sys.executable, "-c", GYM_MAKE_HF, str(random_tiny_checkpoint), str(data)], tmp_path, cache, 600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert cache_state(cache) == profiled, "gym.make after train.py profiled again"
    assert not CONTROL.search(again.stdout + again.stderr)


# ------------------------------------------------------------------------------------------------
# async vector envs: fork and spawn, after the parent ran the env with two torch threads
# ------------------------------------------------------------------------------------------------
def shipped_ids() -> list[str]:
    """The ids ``import envs`` registers in a fresh process (test modules register more, e.g. a KV
    policy defined in a test file, which the probe's own process does not import)."""
    out = subprocess.run([sys.executable, "-c", "import envs; print(' '.join(envs.list_envs()))"], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    return out.stdout.split()


def test_async_vector_envs_fork_and_spawn_every_id_after_the_parent_ran_it(tmp_path):
    """Every shipped id under ``fork`` and ``spawn``, in one probe process: ids run one after the
    other and share only its Python start-up; each spawned worker starts afresh (torch, transformers,
    the env's model), so the spawned workers (two per id) are most of this test's cost."""
    ids = shipped_ids()
    assert {gym.spec(env_id).entry_point.__name__ for env_id in ids} >= {
        "MultiKnobEnv", "TokenBudgetEnv", "DecodingEnv", "StreamingKVEnv"}, ids  # every family is probed
    timeout_s = 300  # per reset or step: a hung worker fails its case instead of blocking CI
    cases = [f"{env_id}:fork,spawn" for env_id in ids]
    result = run([sys.executable, str(REPO / "tests" / "vector_probe.py"), str(timeout_s), *cases], tmp_path,
                 tmp_path / "cache", timeout=timeout_s * (2 * len(ids) + 2))
    done = set(result.stdout.split("\n"))
    missing = [f"{env_id} {context}" for env_id in ids for context in ("fork", "spawn")
               if f"ok {env_id} {context}" not in done]
    assert result.returncode == 0 and not missing, (missing, result.stderr[-3000:])


# ------------------------------------------------------------------------------------------------
# the README's code blocks
# ------------------------------------------------------------------------------------------------
MARK = "<!-- test: runs on a CPU -->"
#: warnings a README block may print (none today); anything else matching WARNING fails the block
EXPECTED_WARNINGS: tuple[str, ...] = ()
WARNING = re.compile(r"warning", re.I)


def readme_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block right after a :data:`MARK` line in README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [(m.group(1), m.group(2)) for m in re.finditer(re.escape(MARK) + r"\s*\n```(\w+)\n(.*?)\n```", text, re.S)]


def test_readme_marks_blocks():
    blocks = readme_blocks()
    assert len(blocks) >= 3 and {language for language, _ in blocks} <= {"python", "bash"}


@pytest.fixture(scope="module")
def seeded_cache(tmp_path_factory) -> Path:
    """A latency cache holding a short profile of the shipped tiny model (what a user's first
    ``gym.make`` writes after minutes of profiling)."""
    root = tmp_path_factory.mktemp("readme")
    seed = SHORT_PROFILE + "import gymnasium as gym, envs\ngym.make('MultiKnob-v0')\n"
    result = run([sys.executable, "-c", seed], REPO, root / "cache", 900)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "cache"


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_block_runs_without_errors_or_warnings(index, seeded_cache):
    language, code = readme_blocks()[index]
    command = [sys.executable, "-"] if language == "python" else ["bash", "-e", "-"]
    result = run(command, REPO, seeded_cache, 600, stdin=code)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"README block {index} failed:\n{code}\n{result.stderr[-3000:]}"
    unexpected = [line for line in output.splitlines()
                  if WARNING.search(line) and not any(w in line for w in EXPECTED_WARNINGS)]
    assert not unexpected, f"README block {index} warned:\n{code}\n" + "\n".join(unexpected)
    assert not CONTROL.search(output)


# ------------------------------------------------------------------------------------------------
# budgets that hold on any machine
# ------------------------------------------------------------------------------------------------
def test_device_relative_budgets_resolve_against_the_achievable_range():
    from envs.budget import Budget, device_budget

    achievable, suggested = (30.0, 60.0), 44.0
    assert device_budget("50%", achievable, suggested) == Budget.fixed(45.0)
    assert device_budget("[25%,75%]", achievable, suggested) == Budget(37.5, 52.5)
    assert device_budget(["0%", "50ms"], achievable, suggested) == Budget(30.0, 50.0)
    assert device_budget("auto", achievable, suggested) == device_budget(None, achievable, suggested) == Budget.fixed(44)
    assert device_budget("45ms", achievable, suggested) == Budget.fixed(45.0)
    assert device_budget("50%") is None  # checked only: an env resolves it once it knows its range
    for bad, why in (("150%", "between 0% and 100%"), ("[10%]", "exactly two bounds"), ("x%", "cannot parse"),
                     ("[80%,20%]", "low must be <= high")):
        with pytest.raises(ValueError, match=re.escape(why)):
            device_budget(bad, achievable, suggested)


def test_a_bad_fraction_is_one_line_before_any_work(tmp_path):
    result = run([sys.executable, str(REPO / "train.py"), "budget=150%"], tmp_path, tmp_path / "cache", 300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.strip().splitlines()
                                                  if line.startswith("error: ")], result.stderr
    assert "150%" in result.stderr and "0% and 100%" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_piped_main_job_has_no_progress_bar_states(seeded_cache, tmp_path):
    """README's main job (``train.py env=MultiKnob-v0 budget=auto``, tiny backend) with tiny
    settings, its output piped as into a log: plain lines only."""
    args = ["env=MultiKnob-v0", "budget=auto", "agent.total_updates=1", "agent.batch_size=2", "agent.num_generations=4",
            "eval.every=1", "eval.num_samples=2", "eval.validation_samples=2", "baselines.static.calibration_samples=1",
            "baselines.bandit.rounds=4"]
    result = run([sys.executable, str(REPO / "train.py"), *args], tmp_path, seeded_cache, 900)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert not CONTROL.search(output), [line for line in output.split("\n") if CONTROL.search(line)][:5]
    assert "Loading weights" not in output and "== summary ==" in output
