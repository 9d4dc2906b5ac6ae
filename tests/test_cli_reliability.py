"""The CLI's failure classes: bad overrides, ``resume=<missing>``, unexpected errors, the run-folder lock.

Each bad input is one ``error:`` line naming the key, the value and what is accepted, exit
status 2, and no run folder left behind; an unexpected error before the first checkpoint is one
line too (status 1) and removes the folder; a run folder is locked while a process trains in it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_output import failure_lines

from knobgym_cli.errors import UsageError, check_overrides
from knobgym_cli.lock import LOCK_NAME, RunFolderLocked, RunLock, pid_alive

REPO = Path(__file__).resolve().parent.parent


def run_cli(script: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    # tests/ on the path: the estimator=fake_latency:make hook imports tests/fake_latency.py.
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]),
               "HYDRA_FULL_ERROR": "0", **env}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=300)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = failure_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def dead_pid() -> int:
    """The pid of a process that has already exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


# ------------------------------------------------------------------------------------------------
# bad overrides: checked before Hydra composes (in-process: every class, one parametrized case each)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,args,expected", [
    # top-level typed keys: wrong type and out of range
    ("config", ["seed=abc"], "seed=abc is invalid; accepted: an integer >= 0"),
    ("config", ["seed=1.5"], "seed=1.5 is invalid; accepted: an integer >= 0"),
    ("config", ["seed=-1"], "seed=-1 is invalid; accepted: an integer >= 0"),
    ("config", ["torch_threads=0"], "torch_threads=0 is invalid; accepted: null or an integer >= 1"),
    ("config", ["torch_threads=two"], "torch_threads=two is invalid; accepted: null or an integer >= 1"),
    ("config", ["checkpoint_every=0"], "checkpoint_every=0 is invalid; accepted: an integer >= 1"),
    ("config", ["sample_pool=-3"], "sample_pool=-3 is invalid; accepted: null or an integer >= 1"),
    ("config", ["sample_pool=true"], "sample_pool=true is invalid; accepted: null or an integer >= 1"),
    ("config", ["eval.num_samples=0"], "eval.num_samples=0 is invalid; accepted: an integer >= 1"),
    ("config", ["eval.every=1e3"], "eval.every=1e3 is invalid; accepted: an integer >= 1"),
    ("config", ["train_split=dev"], "train_split=dev is invalid; accepted: one of train, validation, test"),
    ("config", ["eval.baselines=[greedy,nope]"], "eval.baselines=[greedy,nope] is invalid; accepted: a list of"),
    ("config", ["seed=1,2"], "seed=1,2 is a sweep; accepted: one value per key"),
    ("config", ["~torch_threads"], "~torch_threads would delete a required option"),
    # agent options: through the agent's config dataclass (GRPO) or the declared options
    ("config", ["agent.total_updates=-1"], "agent.total_updates=-1 is invalid; accepted: an integer >= 0"),
    ("config", ["agent.learning_rate=abc"], "agent.learning_rate=abc is invalid; accepted: a finite number"),
    ("config", ["agent.learning_rate=0"], "agent.learning_rate=0 is invalid; accepted: a finite number > 0"),
    ("config", ["agent.num_generations=1"], "agent.num_generations=1 is invalid; accepted: an integer >= 2"),
    ("config", ["agent.hidden_sizes=64"], "agent.hidden_sizes=64 is invalid; accepted: a list like [64, 64]"),
    ("config", ["agent.seed=x"], "agent.seed=x is invalid; accepted: an integer >= 0"),
    ("config", ["agent.nope=1"], "unknown option 'agent.nope' of agent grpo; accepted: batch_size"),
    ("config", ["agent=bandit", "agent.rounds=0"], "agent.rounds=0 is invalid; accepted: an integer >= 1"),
    ("config", ["agent=ppo", "agent.n_steps=1"], "agent.n_steps=1 is invalid; accepted: an integer >= 2"),
    ("config", ["baselines.bandit.ridge=0"], "baselines.bandit.ridge=0 is invalid; accepted: a finite number > 0"),
    ("config", ["baselines.static.calibration_samples=-2"],
     "baselines.static.calibration_samples=-2 is invalid; accepted: an integer >= 1"),
    # a backend option its conf/backend yaml does not declare (Hydra's "not in struct", several lines)
    ("config", ["backend.options.checkpoint=x"], "unknown option 'backend.options.checkpoint' of backend tiny; "
                                                 "accepted: backend.checkpoint"),
    # evaluate.py's own keys
    ("evaluate", ["run=x", "checkpoint=last"], "checkpoint=last is invalid; accepted: one of best, latest"),
    ("evaluate", ["run=x", "num_samples=0"], "num_samples=0 is invalid; accepted: null or an integer >= 1"),
    ("evaluate", ["run=x", "torch_threads=-4"], "torch_threads=-4 is invalid; accepted: null or an integer >= 1"),
    ("evaluate", ["run=x", "baselines=[nope]"], "baselines=[nope] is invalid; accepted: a list of"),
])
def test_bad_typed_overrides_name_the_key_value_and_accepted(config, args, expected):
    with pytest.raises(UsageError) as caught:
        check_overrides(args, config)
    assert expected in str(caught.value)


@pytest.mark.parametrize("config,args", [
    ("config", ["seed=3", "torch_threads=2", "checkpoint_every=5", "sample_pool=null", "sample_pool=64",
                "eval.baselines=[greedy,oracle]", "train_split=validation"]),
    ("config", ["agent.total_updates=0", "agent.learning_rate=3e-3", "agent.hidden_sizes=[32,32]",
                "agent.scale_rewards=batch", "agent.epsilon_high=0.3"]),
    ("config", ["agent=bandit", "agent.rounds=8", "agent.alpha=0", "baselines.ppo.n_steps=64"]),
    ("config", ["agent=ppo", "agent.learning_rate=1e-4", "agent.total_timesteps=512"]),
    ("config", ["resume=false", "resume=null"]),
    ("evaluate", ["run=x", "checkpoint=latest", "num_samples=null", "baselines=[static,greedy]"]),
])
def test_good_typed_overrides_pass(config, args):
    check_overrides(args, config)


def test_resume_of_a_missing_or_empty_folder_names_the_path(tmp_path):
    with pytest.raises(UsageError, match=r"resume=.*no such run folder .*nowhere.*accepted: resume=true"):
        check_overrides([f"resume={tmp_path / 'nowhere'}"], "config")
    with pytest.raises(UsageError, match=r"holds no checkpoints/latest; accepted"):
        check_overrides([f"resume={tmp_path}"], "config")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.safetensors").write_bytes(b"")
    check_overrides([f"resume={tmp_path}"], "config")  # a run folder: accepted here (read later)


# ------------------------------------------------------------------------------------------------
# through the real CLI: exit status 2, one line, nothing created
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,expected", [
    (["seed=abc"], "seed=abc is invalid"),
    (["torch_threads=0"], "torch_threads=0 is invalid"),
    (["checkpoint_every=0"], "checkpoint_every=0 is invalid"),
    (["sample_pool=-3"], "sample_pool=-3 is invalid"),
    (["agent.total_updates=-1"], "agent.total_updates=-1 is invalid"),
    (["resume=does/not/exist"], "resume=does/not/exist: no such run folder 'does/not/exist'"),
    (["budget=1e-310ms"], "invalid budget '1e-310ms': must be between 0.01 ms and 3600000 ms"),
    (["budget=1e-300ms"], "invalid budget '1e-300ms': must be between 0.01 ms and 3600000 ms"),
])
def test_cli_bad_input_is_one_line_exit_2_and_no_folder(tmp_path, args, expected):
    result = run_cli("train.py", args, tmp_path)
    assert result.returncode == 2
    assert expected in one_error_line(result)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "does").exists()


def test_cli_unexpected_error_before_first_checkpoint_is_one_line_and_removes_the_folder(
        tmp_path, random_tiny_checkpoint):
    args = [f"backend.checkpoint={random_tiny_checkpoint}", "estimator=no_such_module_xyz:make"]
    result = run_cli("train.py", args, tmp_path)
    assert result.returncode == 1
    line = one_error_line(result)
    assert "unexpected ModuleNotFoundError" in line and "no_such_module_xyz" in line
    assert "HYDRA_FULL_ERROR=1" in line
    assert not (tmp_path / "runs").exists(), "the run folder (or the folders above it) was left behind"


def test_cli_bad_value_found_late_removes_the_folder(tmp_path, random_tiny_checkpoint):
    """A ValueError raised after the folder exists (the env rejects its kwargs) leaves nothing either."""
    args = [f"backend.checkpoint={random_tiny_checkpoint}", "estimator=fake_latency:make",
            "+env.kwargs.latency=wallclock"]
    result = run_cli("train.py", args, tmp_path)
    assert result.returncode == 2 and "wallclock" in one_error_line(result)
    assert not (tmp_path / "runs").exists()


def test_cli_missing_model_is_one_line_exit_2(tmp_path):
    """ModelNotAvailableError is a ValueError: a model path that does not exist is a bad value."""
    result = run_cli("train.py", [f"backend.checkpoint={tmp_path / 'no-model'}"], tmp_path)
    assert result.returncode == 2
    assert f"local model path '{tmp_path / 'no-model'}' does not exist" in one_error_line(result)
    assert not (tmp_path / "runs").exists()


def test_a_discarded_run_folder_removes_only_the_empty_folders_its_creation_made(tmp_path):
    from knobgym_cli.runs import discard_failed_run_dir, new_run_dir

    (tmp_path / "runs").mkdir()
    first = new_run_dir(tmp_path / "runs", "MultiKnob-v0", "grpo")  # makes MultiKnob-v0/ and grpo/ too
    other = first.parent / "2026-01-01_00-00-00"  # another process's run, started meanwhile
    other.mkdir()
    discard_failed_run_dir(first)
    assert not first.exists() and other.is_dir()  # grpo/ is not empty: it stays, and so does all above it
    other.rmdir()
    second = new_run_dir(tmp_path / "runs", "TokenBudget-v0", "static")
    discard_failed_run_dir(second)
    assert not (tmp_path / "runs" / "TokenBudget-v0").exists()  # made for it, empty again: removed
    assert (tmp_path / "runs" / "MultiKnob-v0" / "grpo").is_dir()  # not made for it: left
    assert (tmp_path / "runs").is_dir()  # there before: left


# ------------------------------------------------------------------------------------------------
# the run-folder lock
# ------------------------------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from knobgym_cli.lock import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()   # hold until the test closes stdin
""")


@pytest.fixture
def held_run(tmp_path):
    """A run folder (with a checkpoint entry) whose lock another live process holds; yields (dir, pid)."""
    run = tmp_path / "runs" / "MultiKnob-v0" / "grpo" / "2026-01-01_00-00-00"
    for name in ("checkpoints/latest.safetensors", ".hydra/config.yaml", "train.log"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(b"")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "locked"
    yield run, holder.pid
    holder.stdin.close()
    holder.wait(timeout=60)


def test_a_second_lock_names_the_holder(held_run):
    run, pid = held_run
    with pytest.raises(RunFolderLocked, match=rf"in use by pid {pid} on host '{socket.gethostname()}'"):
        RunLock(run).acquire()
    record = json.loads((run / LOCK_NAME).read_text())
    assert record["pid"] == pid and record["host"] == socket.gethostname() and record["started"]


def test_cli_resume_of_a_folder_in_use_exits_2_and_leaves_it_alone(held_run):
    run, pid = held_run
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    result = run_cli("train.py", [f"resume={run}"], run.parents[3])
    assert result.returncode == 2
    line = one_error_line(result)
    assert f"is in use by pid {pid}" in line and str(run) in line
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # its own .hydra record removed
    assert (run / "checkpoints" / "latest.safetensors").exists()


def test_the_lock_is_released_and_the_file_removed(tmp_path):
    with RunLock(tmp_path) as lock:
        assert lock.held and (tmp_path / LOCK_NAME).exists() and lock.took_over is None
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path):  # free again
        pass


def test_a_stale_lock_is_taken_over_and_said_so(tmp_path):
    pid = dead_pid()
    stale = {"pid": pid, "host": socket.gethostname(), "started": "2026-11-30T00:00:00+00:00", "command": "train.py"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale))
    with RunLock(tmp_path) as lock:
        assert lock.took_over == stale
        message = lock.stale_message()
        assert f"pid {pid}" in message and "no longer running" in message
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_without_flock_a_dead_pid_is_stale_and_a_live_one_holds(tmp_path, monkeypatch):
    """The fallback for file systems without flock judges the record: pid liveness on this host."""
    monkeypatch.setattr(RunLock, "_flock", staticmethod(lambda fd: None))
    record = {"pid": dead_pid(), "host": socket.gethostname(), "started": "t"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with RunLock(tmp_path) as lock:
        assert lock.took_over["pid"] == record["pid"]
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({**record, "pid": live.pid}))
        with pytest.raises(RunFolderLocked, match=f"pid {live.pid}"):
            RunLock(tmp_path).acquire()
        (tmp_path / LOCK_NAME).write_text(json.dumps({**record, "pid": live.pid, "host": "elsewhere"}))
        with pytest.raises(RunFolderLocked, match="host 'elsewhere'"):
            RunLock(tmp_path).acquire()
    finally:
        live.stdin.close()
        live.wait(timeout=60)


def test_cli_takes_over_a_stale_lock_and_says_so(tmp_path):
    """``train.py resume=<run>`` with a stale lock: a warning line naming the dead pid, then it goes on
    (here to the checkpoint, which this fake run folder leaves empty), and the lock is released."""
    run = tmp_path / "runs" / "MultiKnob-v0" / "grpo" / "2026-01-01_00-00-00"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest.safetensors").write_bytes(b"")
    pid = dead_pid()
    (run / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "t"}))
    result = run_cli("train.py", [f"resume={run}"], tmp_path)
    assert f"warning: took over the stale lock of run folder {str(run)!r} left by pid {pid}" in result.stderr
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (run / LOCK_NAME).exists() and (run / "checkpoints" / "latest.safetensors").exists()


@pytest.mark.parametrize("case", ["model missing", "model without config.json", "dataset missing",
                                  "dataset folder not save_to_disk", "dataset of another kind"])
def test_backend_hf_paths_are_checked_in_one_line_before_any_loading(tmp_path, case):
    """A bad ``backend=hf`` path is the only line on stderr (no "loading the model" phase line before
    it), exit 2, no run folder: ``check_backend`` runs before ``budget=auto`` loads anything."""
    model, dataset = REPO / "backends" / "tiny" / "checkpoint", tmp_path / "data.jsonl"
    dataset.write_text('{"question": "q", "answer": "a"}\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    model, dataset, expected = {
        "model missing": (tmp_path / "no-model", dataset, "does not exist"),
        "model without config.json": (tmp_path / "empty", dataset, "has no config.json"),
        "dataset missing": (model, tmp_path / "no.jsonl", "does not exist"),
        "dataset folder not save_to_disk": (model, tmp_path / "empty", "is not a save_to_disk dataset"),
        "dataset of another kind": (model, tmp_path / "notes.txt", "is neither a JSON-lines file"),
    }[case]
    result = run_cli("train.py", ["backend=hf", f"backend.model={model}", f"backend.dataset={dataset}"], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()


def test_check_backend_runs_a_registered_check_and_loads_nothing():
    from backends import registry

    seen = {}
    registry.register_backend("checked-tiny", lambda **options: pytest.fail("loaded"),
                              check=lambda **options: seen.update(options))
    try:
        registry.check_backend({"name": "checked-tiny", "model": "m"})
        registry.check_backend("tiny")  # no check registered: nothing to do
    finally:
        registry._FACTORIES.pop("checked-tiny")
        registry._CHECKS.pop("checked-tiny", None)
    assert seen == {"model": "m"}


@pytest.mark.parametrize("case", ["model_path missing", "model_path without config.json", "model_spec missing",
                                  "dataset missing", "dataset of another kind"])
def test_kv_env_paths_are_checked_in_one_line_before_any_loading(tmp_path, case):
    """The KV envs name their files in ``env.kwargs``: a bad one is the only line on stderr (no
    "loading the model" phase before it, no "unexpected OSError"), exit 2, no run folder."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.csv").write_text("x")
    option, expected = {
        "model_path missing": (f"+env.kwargs.model_path={tmp_path / 'no-model'}", "is not a folder"),
        "model_path without config.json": (f"+env.kwargs.model_path={tmp_path / 'empty'}", "has no config.json"),
        "model_spec missing": (f"+env.kwargs.model_spec={tmp_path / 'no-model'}", "does not exist"),
        "dataset missing": (f"+env.kwargs.dataset={tmp_path / 'no.jsonl'}", "does not exist"),
        "dataset of another kind": (f"+env.kwargs.dataset={tmp_path / 'notes.csv'}", "is none of a text file"),
    }[case]
    result = run_cli("train.py", ["env=StreamingKV-v0", "budget=auto", option], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()
