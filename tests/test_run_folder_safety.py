"""A run folder is data: nothing in it runs code, nothing writes through it to elsewhere.

Each test plants what a hostile run folder (received from someone else) could hold and asserts one
clear ``error:`` line, exit status 2 (or a stated warning), nothing written outside the folder and
no marker file created by planted code:

- code: a recorded config naming an estimator ``module:callable``, an agent ``module`` or
  ``backend.trust_remote_code=true``, with the Python file it names importable;
- writes: symlinks where the lock, the log, checkpoints and reports go; a ``report.json`` whose
  ``finished_at`` is a path;
- integrity: non-finite weights at save, load and after an update; ``evaluate.py out=`` checks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_output import failure_lines

from agents.checkpoint import read_checkpoint, write_checkpoint

REPO = Path(__file__).resolve().parent.parent
ESTIMATOR = "estimator=fake_latency:make"


def run_cli(script: str, args: list[str], cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    paths = [str(REPO / "tests"), str(REPO)] + ([str(extra_path)] if extra_path else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def one_error(result: subprocess.CompletedProcess) -> str:
    lines = failure_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry below ``folder`` with its kind, size and mtime (what must not change)."""
    return {str(p.relative_to(folder)): (p.is_symlink(), p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, random_tiny_checkpoint) -> Path:
    root = tmp_path_factory.mktemp("foreign")
    args = [f"backend.checkpoint={random_tiny_checkpoint}", "backend.generation={max_new_tokens:2}", ESTIMATOR,
            "budget=80ms", "agent.total_updates=2", "agent.batch_size=2", "agent.num_generations=4", "eval.every=1",
            "eval.num_samples=1", "eval.validation_samples=1", "checkpoint_every=1", "eval.baselines=[greedy]"]
    result = run_cli("train.py", args, root)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (root / "runs" / "MultiKnob-v0" / "grpo").iterdir()
    return run


@pytest.fixture
def foreign(trained_run, tmp_path) -> Path:
    """A copy of the trained run, as received from someone else (in ``tmp_path/inbox/run``)."""
    return Path(shutil.copytree(trained_run, tmp_path / "inbox" / "run", symlinks=True))


def edit_config(run: Path, **changes) -> None:
    """Rewrite every checkpoint's recorded config as an attacker would (the checksum recomputed)."""
    for path in (run / "checkpoints").glob("*.safetensors"):
        ckpt = read_checkpoint(path)
        config = ckpt["metadata"]["config"]
        for dotted, value in changes.items():
            node = config
            *parents, last = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = value
        write_checkpoint(path, ckpt["agent"], ckpt["env_id"], ckpt["state"], ckpt["metadata"])


def plant_module(folder: Path, marker: Path) -> None:
    """``folder/planted.py``: importing it creates ``marker`` (and then fails, to stop the run)."""
    (folder / "planted.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                       "def make(backend):\n    raise SystemExit(3)\n")


# ------------------------------------------------------------------------------------------------
# code named in a run folder is never run
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["evaluate.py", "train.py"])
@pytest.mark.parametrize("change, expected", [
    ({"estimator": "planted:make"}, "names estimator='planted:make', which is not a registered estimator"),
    ({"agent.module": "planted", "agent.name": "planted_agent"},
     "names agent 'planted_agent', which is not a registered agent (knobgym never imports its module 'planted'"),
    ({"backend.trust_remote_code": True}, "sets backend.trust_remote_code=true; a run folder never turns on code"),
    ({"env.id": "planted:MultiKnob-v0"}, "names env 'planted:MultiKnob-v0', whose module would be imported"),
])
def test_code_named_in_a_run_folder_is_refused_and_never_run(foreign, tmp_path, script, change, expected):
    marker = tmp_path / "code-ran"
    plant_module(foreign, marker)
    edit_config(foreign, **change)
    args = [f"run={foreign}"] if script == "evaluate.py" else [f"resume={foreign}", "agent.total_updates=3"]
    if "estimator" not in change:  # the run's own test estimator, named on the command line as a user would
        args.append(ESTIMATOR)
    result = run_cli(script, args, tmp_path, extra_path=foreign)  # the planted file is importable
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_error(result)
    assert expected in line and "checkpoints/" in line, line
    assert not marker.exists()


def test_the_planted_module_would_run_if_named_on_the_command_line(foreign, tmp_path):
    """The refusal above is what keeps the marker away: the same file named by the user runs."""
    marker = tmp_path / "code-ran"
    plant_module(foreign, marker)
    edit_config(foreign, estimator="planted:make")
    result = run_cli("evaluate.py", [f"run={foreign}", "estimator=planted:make"], tmp_path, extra_path=foreign)
    assert result.returncode == 3 and marker.exists(), result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# nothing is written through a link, nor moved out of the folder
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def outside(tmp_path) -> Path:
    """A file outside the run folder that a planted link points at (it must never change)."""
    path = tmp_path / "elsewhere" / "precious.txt"
    path.parent.mkdir()
    path.write_text("precious\n")
    return path


def test_the_lock_log_and_atomic_writes_refuse_a_link(tmp_path, outside):
    from backends.io import SymlinkRefused, atomic_write_json
    from knobgym_cli.lock import RunLock
    from knobgym_cli.logs import setup_cli_logging

    run = tmp_path / "run"
    run.mkdir()
    for name in ("run.lock", "train.log", "report.json"):
        (run / name).symlink_to(outside)
    with pytest.raises(SymlinkRefused, match="run.lock.*symbolic link"):
        RunLock(run).acquire()
    with pytest.raises(SymlinkRefused, match="train.log.*symbolic link"):
        setup_cli_logging(run / "train.log")
    with pytest.raises(SymlinkRefused, match="report.json.*symbolic link"):
        atomic_write_json(run / "report.json", {"x": 1})
    assert outside.read_text() == "precious\n" and (run / "report.json").is_symlink()
    setup_cli_logging(None)


def test_a_run_folder_holding_a_link_is_refused_naming_it(tmp_path, outside):
    from knobgym_cli.errors import UsageError
    from knobgym_cli.runs import check_run_folder

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    check_run_folder(run)
    (run / "checkpoints" / "best.safetensors").symlink_to(outside)
    with pytest.raises(UsageError, match=r"symbolic link 'checkpoints/best.safetensors' \(to '.*precious.txt'\)"):
        check_run_folder(run)


@pytest.mark.parametrize("finished_at", ["../../escaped", "/tmp/escaped-abs", "2026-01-01_00-00-00/../../x", 7])
def test_a_report_field_never_becomes_a_path(tmp_path, finished_at):
    from knobgym_cli.summary import archive_previous_report, previous_report_problem

    run = tmp_path / "a" / "b" / "run"
    run.mkdir(parents=True)
    (run / "report.json").write_text(f'{{"finished_at": {finished_at!r}}}'.replace("'", '"'))
    (run / "report.md").write_text("# old\n")
    before = {p for p in tmp_path.rglob("*") if run not in (p, *p.parents)}
    assert "not a valid knobgym file" in previous_report_problem(run)  # said at the start of a resume
    target = archive_previous_report(run)
    assert target.parent == run / "reports" and (target / "report.md").read_text() == "# old\n"
    assert {p for p in tmp_path.rglob("*") if run not in (p, *p.parents)} == before
    assert not Path("/tmp/escaped-abs").exists()


def test_resume_of_a_folder_with_a_planted_log_link_is_refused_before_any_write(foreign, tmp_path, outside):
    (foreign / "train.log").unlink()
    (foreign / "train.log").symlink_to(outside)
    before = snapshot(foreign)
    result = run_cli("train.py", [f"resume={foreign}", ESTIMATOR], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "holds a symbolic link 'train.log'" in one_error(result)
    assert outside.read_text() == "precious\n" and snapshot(foreign) == before  # not even Hydra's record


def test_evaluate_refuses_a_checkpoint_that_resolves_outside_the_folder(foreign, tmp_path):
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(foreign / "checkpoints" / "best.safetensors", elsewhere)
    (foreign / "checkpoints" / "best.safetensors").symlink_to(elsewhere)
    result = run_cli("evaluate.py", [f"run={foreign}", ESTIMATOR], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "symbolic link 'checkpoints/best.safetensors'" in one_error(result)


# ------------------------------------------------------------------------------------------------
# evaluate.py out=: checked before any work, never the run's own report
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out, expected", [("run", "is a training run's folder"), ("file", "is an existing file")])
def test_evaluate_out_is_checked_before_any_work(foreign, tmp_path, out, expected):
    target = foreign if out == "run" else tmp_path / "taken.txt"
    if out == "file":
        target.write_text("mine\n")
    before = snapshot(foreign)
    result = run_cli("evaluate.py", [f"run={foreign}", ESTIMATOR, f"out={target}"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in one_error(result) and "loading the model" not in result.stderr
    assert snapshot(foreign) == before and (out == "run" or target.read_text() == "mine\n")


# ------------------------------------------------------------------------------------------------
# a diverged policy is an error at save, at load and after an update, naming the tensor
# ------------------------------------------------------------------------------------------------
def test_non_finite_parameters_are_refused_at_save_and_at_load(tmp_path):
    import torch

    from agents.checkpoint import NonFiniteError, _encode
    from backends.io import CorruptFileError, save_tensors

    state = {"policy": {"net.0.weight": torch.tensor([1.0, float("nan")]), "net.0.bias": torch.zeros(2)},
             "step": 3}
    path = tmp_path / "checkpoints" / "latest.safetensors"
    with pytest.raises(NonFiniteError, match=r"refusing to save .*latest.safetensors.*'policy.net.0.weight' holds NaN"):
        write_checkpoint(path, "grpo", "MultiKnob-v0", state)
    assert not path.exists()
    tensors: dict = {}  # a diverged checkpoint written by something else (an older knobgym, an edit)
    skeleton = _encode(state, tensors)
    save_tensors(path, tensors, {"format": "knobgym-agent-checkpoint", "format_version": 1, "agent": "grpo",
                                 "env_id": "MultiKnob-v0", "metadata": {}, "state": skeleton})
    with pytest.raises(CorruptFileError, match=r"latest.safetensors.*'policy.net.0.weight' holds NaN or inf"):
        read_checkpoint(path)


def test_a_diverging_update_stops_naming_the_tensor(random_tiny_checkpoint):
    import gymnasium as gym
    from fake_latency import AnalyticEstimator

    from agents import agent_class
    from agents.base import EnvLayout
    from agents.checkpoint import NonFiniteError

    env = gym.make("MultiKnob-v0", backend={"name": "tiny", "checkpoint": str(random_tiny_checkpoint),
                                            "generation": {"max_new_tokens": 2}},
                   estimator=AnalyticEstimator(), budget="80ms")
    agent = agent_class("grpo").from_env(env, batch_size=2, num_generations=4, seed=0)
    rollout, _ = agent.train_step(EnvLayout(env), env.unwrapped.budget)
    for group in agent.optimizer.param_groups:  # an absurd learning rate: the next step overflows
        group["lr"] = float("inf")
    with pytest.raises(NonFiniteError, match=r"GRPO update 2 diverged: tensor 'policy\.[\w.]+' holds NaN or inf"):
        agent.update(rollout)


def test_a_checkpoint_is_checked_by_its_header_before_it_is_read(tmp_path, monkeypatch):
    """A large file that is not a checkpoint is refused from its first bytes, never read whole."""
    from backends.io import CorruptFileError

    path = tmp_path / "best.safetensors"
    with open(path, "wb") as f:  # 1 GiB, sparse: an 8-byte "header length" larger than the file
        f.write((5 << 30).to_bytes(8, "little"))
        f.truncate(1 << 30)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read whole"))
    with pytest.raises(CorruptFileError, match=r"best.safetensors.*1073741824 bytes, header length 5368709120"):
        read_checkpoint(path)
    path.write_bytes((16).to_bytes(8, "little") + b'{"t": {"dtype": "F32", "shape": [9], "data_offsets": [0, 36]}}')
    with pytest.raises(CorruptFileError, match="not a safetensors file"):
        read_checkpoint(path)


# ------------------------------------------------------------------------------------------------
# a file asked to be read is never written
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["other-sqlite", "empty"])
def test_backend_trace_never_writes_to_a_file_that_is_not_a_trace(tmp_path, kind):
    import sqlite3

    from backends.trace import TraceBackend, TraceError

    path = tmp_path / "notes.db"
    if kind == "empty":
        path.write_bytes(b"")
    else:
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE notes (text TEXT)")
            conn.execute("INSERT INTO notes VALUES ('mine')")
        conn.close()
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    with pytest.raises(TraceError, match=r"notes.db' is not a trace \(an SQLite file without the table\(s\) meta"):
        TraceBackend(path)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before and sorted(os.listdir(tmp_path)) == ["notes.db"]


# ------------------------------------------------------------------------------------------------
# every bad input is one line, exit 2, before any work
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, args, expected", [
    ("config", ["eval.nope=1"], "unknown option 'eval.nope'; accepted: eval.split, "),
    ("config", ["baselines.nope.rounds=3"], "unknown option 'baselines.nope'; accepted: baselines.static, "),
    ("evaluate", [], "run is missing; accepted: run=<value> (the run folder written by train.py)"),
    ("config", ["runs_dir={file}"], "runs_dir={file} is an existing file; accepted: a folder"),
    ("config", ["hydra.run.dir={file}/x"], "hydra.run.dir={file}/x lies under the file '{file}'"),
    ("config", ["+env.kwargs.nope=1"], "unknown option env.kwargs.nope of env MultiKnob-v0; accepted: "),
    ("config", ["budget=20ms+256tok"], "budget=20ms+256tok has a KV-cache cap, which env MultiKnob-v0 has no cache"),
    ("config", ["budget=50%+256tok"], "budget=50%+256tok has a KV-cache cap, which env MultiKnob-v0 has no cache"),
    ("config", ["env=StreamingKV-v0", "budget=20ms+1e400tok"], "the KV cap '1e400tok' is too large"),
    ("config", ["eval.budgets=4x5ms"], "invalid budget '4x5ms': cannot parse"),
    ("config", ["agent.hidden_sizes=[64.5,3]"], "agent.hidden_sizes=[64.5, 3] is invalid; accepted: a list of whole"),
    ("config", ["seed=99999999999999999999999"], "seed=99999999999999999999999 is invalid; accepted: an integer >= 0 "
                                                 "and <= 4294967295 (random seed)"),
])
def test_bad_input_is_one_line_naming_the_key_before_any_work(tmp_path, config, args, expected):
    from knobgym_cli.errors import check_composition, check_overrides

    file = tmp_path / "afile"
    file.write_text("")
    args = [a.replace("{file}", str(file)) for a in args]
    with pytest.raises(ValueError) as err:  # a UsageError or a budget's ValueError: one line, exit 2
        check_overrides(args, config)
        check_composition(args, config)
    assert expected.replace("{file}", str(file)) in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["afile"]


@pytest.mark.parametrize("args", [["env=StreamingKV-v0", "budget={tpot:[15ms,25ms],kv:256tok}"],
                                  ["env=StreamingKV-v0", "budget=20ms+256tok"], ["eval.budgets=45ms"],
                                  ["env=StreamingKV-v0", "budget={tpot:[25%,75%],kv:256tok}"],
                                  ["env=StreamingKV-v0", "budget={tpot:50%,kv:256tok}"],
                                  ["budget=[35ms,55ms]"]])
def test_documented_budget_forms_pass(args):
    from knobgym_cli.build import eval_budgets
    from knobgym_cli.errors import check_composition, check_overrides

    check_overrides(args, "config")
    check_composition(args, "config")
    assert eval_budgets(None, "45ms") == [45.0]  # one budget, not its characters


def test_a_hydra_level_failure_is_one_line_exit_2(tmp_path):
    result = run_cli("train.py", ["eval.nope=1"], tmp_path)
    assert result.returncode == 2 and "unknown option 'eval.nope'" in one_error(result)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------
# a user's data through backend=hf: converted correctly, or skipped, counted and named
# ------------------------------------------------------------------------------------------------
def test_image_modes_keep_their_intensities():
    import numpy as np
    from PIL import Image

    from backends.vqa_data import to_rgb

    ramp = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0..65535
    for im in (Image.fromarray(ramp), Image.fromarray(ramp.astype(np.int32))):  # modes I;16 and I
        rgb = to_rgb(im)
        assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
        assert np.array_equal(rgb[..., 0], np.round(ramp / 257).astype(np.uint8))  # not all-white
    clear = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert (to_rgb(clear) == 255).all()  # transparent: white, not black
    with pytest.raises(ValueError, match="mode F"):
        to_rgb(Image.new("F", (2, 2)))


def test_rows_without_question_or_reference_are_skipped_counted_and_named(tmp_path, caplog):
    import json
    import logging

    import numpy as np
    from PIL import Image

    from backends.vqa_data import DataError, DatasetSpec, VQADataset

    Image.fromarray(np.full((8, 8), 30000, np.uint16)).save(tmp_path / "deep.png")  # a 16-bit PNG
    rows = [{"question": "q0", "answers": ["a"], "image": "deep.png", "id": "ok"},
            {"question": None, "answers": ["a"], "image": "deep.png", "id": "null-question"},
            {"question": "q2", "answers": [], "image": "deep.png", "id": "no-answers"},
            {"question": "q3", "answers": [None, ""], "image": "deep.png", "id": "blank-answers"}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = VQADataset(DatasetSpec({"train": path, "validation": path, "test": path}), needs_image=True)
    with caplog.at_level(logging.WARNING, logger="backends.vqa_data"):
        (sample,) = data.samples("train")
    assert sample.question == "q0" and sample.reference == "a" and int(sample.image[0, 0, 0]) == round(30000 / 257)
    assert data.skipped["train"] == 3
    assert "1 with no question (first: row 1 (id 'null-question'))" in caplog.text
    assert "2 with no reference answer (first: row 2 (id 'no-answers'))" in caplog.text
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    with pytest.raises(DataError, match=r"split 'train' .* is empty \(3 samples skipped: 1 with no question"):
        VQADataset(DatasetSpec({"train": path, "validation": path, "test": path}), needs_image=True).samples("train")


# ------------------------------------------------------------------------------------------------
# a latency profile knows how fast its machine was
# ------------------------------------------------------------------------------------------------
def scripted_probe(monkeypatch, readings: list[float]) -> list[float]:
    """Make the speed probe return ``readings`` in order (the real probe's timing is the machine's)."""
    from latency_model import speed

    monkeypatch.setenv("KNOBGYM_SPEED_PROBE_BOUND", "1.5")
    left = list(readings)
    monkeypatch.setattr(speed, "speed_probe_ms", lambda repeats=speed.REPEATS: left.pop(0))
    return left


def test_the_speed_probe_is_recorded_compared_and_shown(tmp_path, monkeypatch):
    import warnings

    from test_latency_model import FAST, FakeBackend

    from latency_model import SpeedShiftWarning, get_estimator, read_profile, speed
    from latency_model.cache import cache_paths, describe

    assert speed.speed_probe_ms(repeats=1) > 0  # the real probe runs (its time is not asserted)
    left = scripted_probe(monkeypatch, [10.0, 11.0, 10.5, 30.0])  # profile: before, after; then two uses
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpeedShiftWarning)
        estimator = get_estimator(FakeBackend(), tmp_path, settings=FAST, progress=False)
        assert estimator.fingerprint["speed_probe"] == {"before_ms": 10.0, "after_ms": 11.0, "bound": 1.5}
        get_estimator(FakeBackend(), tmp_path, settings=FAST, progress=False)  # 10.5 ms now: within 1.5x
    with pytest.warns(SpeedShiftWarning, match=r"runs the speed probe in 30.00 ms, 2.86x slower than when the "
                                               r"latency profile .* was taken \(10.50 ms; bound 1.5x\).*python -m "
                                               r"latency_model profile backend=.* force=true"):
        get_estimator(FakeBackend(), tmp_path, settings=FAST, progress=False)
    assert not left
    _, profile_path = cache_paths(FakeBackend(), tmp_path)
    assert read_profile(profile_path).device["speed_probe"]["after_ms"] == 11.0
    assert describe(estimator)["speed_probe"]["before_ms"] == 10.0  # what versions.json shows


def test_the_profile_command_does_not_say_it_cached_what_the_speed_shift_refused(tmp_path, monkeypatch, capsys):
    from latency_model import SpeedShiftWarning
    from latency_model.__main__ import main

    scripted_probe(monkeypatch, [10.0, 24.0, 24.0, 24.0])
    with pytest.warns(SpeedShiftWarning, match="is not cached"):
        rc = main(["profile", "backend=tiny", f"cache_dir={tmp_path}", "points=6", "repeats=2", "warmup=0",
                   "samples=3", "remeasure_rounds=0", "max_noise_pct=100000"])
    out = capsys.readouterr()
    assert rc == 1 and "profile NOT cached: the machine's speed moved" in out.err and "wrote" not in out.out
    assert not list(tmp_path.iterdir())


def test_a_profile_whose_speed_moved_while_it_was_taken_is_not_cached(tmp_path, monkeypatch):
    from test_latency_model import FAST, FakeBackend

    from latency_model import SpeedShiftWarning, get_estimator
    from latency_model.cache import cache_paths

    scripted_probe(monkeypatch, [10.0, 24.0])
    with pytest.warns(SpeedShiftWarning, match=r"is not cached: the machine's speed moved while it was measured "
                                               r"\(speed probe: 10.00 ms before / 24.00 ms after profiling"):
        get_estimator(FakeBackend(), tmp_path, settings=FAST, progress=False)
    assert not any(p.exists() for p in cache_paths(FakeBackend(), tmp_path))
