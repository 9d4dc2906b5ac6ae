"""The deployable controller (``serving``): the Python API for every trainable agent, the HTTP endpoint
(a real server on localhost, a real client) and ``serve.py``'s requests-file mode.

Run folders are written in-process (a checkpoint with the run's config, as train.py writes it) for a
randomly initialised tiny model and the analytic stand-in estimator, so every agent is covered in
seconds; the served answers are checked against the env's own episodes on the same inputs.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401
from agents import FitContext, make_agent, run_episode
from backends.tiny import data
from fake_latency import AnalyticEstimator
from knobgym_cli.checkpoints import save_run_checkpoint
from serving import Controller, ControllerError, Request

REPO = Path(__file__).resolve().parent.parent
BUDGET = "80ms"
AGENTS = ("grpo", "grpo_lm", "ppo", "bandit", "static", "greedy")


@pytest.fixture(scope="module")
def run_config(random_tiny_checkpoint) -> dict:
    return {"env": {"id": "MultiKnob-v0"}, "budget": BUDGET, "seed": 0,
            "backend": {"name": "tiny", "checkpoint": str(random_tiny_checkpoint), "generation": {"max_new_tokens": 2}}}


@pytest.fixture(scope="module")
def env(run_config):
    return gym.make("MultiKnob-v0", budget=BUDGET, backend=run_config["backend"], estimator=AnalyticEstimator())


def fitted(name: str, env) -> object:
    options = {"ppo": {"total_timesteps": 4, "n_steps": 2, "batch_size": 2}, "bandit": {"rounds": 2},
               "static": {"calibration_samples": 1}}.get(name, {})
    agent = make_agent(name, env, **options)
    if name in ("ppo", "bandit", "static"):
        agent.fit(env, FitContext(budgets_ms=[80.0]))
    return agent


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env, run_config) -> dict[str, Path]:
    """One run folder per trainable agent: ``checkpoints/best.safetensors`` as train.py writes it."""
    root = tmp_path_factory.mktemp("serving-runs")
    out = {}
    for name in AGENTS:
        run = root / "MultiKnob-v0" / name / "t0"
        save_run_checkpoint(run / "checkpoints" / "best.safetensors", fitted(name, env), env,
                            {**run_config, "agent": {"name": name}}, step=1)
        out[name] = run
    return out


def request_of(split: str, index: int, budget=BUDGET) -> Request:
    sample = data.make_sample(split, index, data.DEFAULT_SEED)
    return Request(question=sample.question, image=sample.image, budget=budget, answers=(sample.reference,),
                   question_type=data.QUESTION_TYPES[sample.question_type], id=f"{split}-{index}")


@pytest.mark.parametrize("name", AGENTS)
def test_every_trainable_agent_serves_the_env_episode_choice(runs, env, name):
    """The controller's knobs, answer and score equal the env episode's on the same input and budget:
    the served observation path is the env's, with no labels or reward involved in choosing (the
    policy's own choices: unguarded)."""
    controller = Controller.from_run(runs[name], estimator=AnalyticEstimator(), guard=None)
    assert controller.agent.name == name and controller.budget_ms == 80.0
    reference = Controller.from_run(runs[name], estimator=AnalyticEstimator()).agent  # a fresh copy for the env
    for index in range(2):
        request = request_of("test", index)
        answer = controller.answer(request)
        info = run_episode(env, reference, index, 80.0, "test")
        assert answer.knobs == info["knobs"], (name, index)
        assert answer.answer == info["answer"] and answer.score == pytest.approx(info["score"])
        assert answer.estimated_ms == pytest.approx(info["latency_ms"])
        assert answer.predicted_ms > 0 and answer.measured_ms > 0 and answer.model_ms > 0
        assert answer.within_budget == (answer.measured_ms <= 80.0) and answer.id == f"test-{index}"


@pytest.mark.parametrize("name", ["greedy", "grpo"])
def test_the_budget_guard_serves_what_the_estimator_fits_else_the_static(runs, env, name):
    """Guarded: a policy's choice predicted within budget stands; one predicted over is replaced by the
    dearest configuration predicted within budget; with none, the calibrated static's configuration is
    served. Per request the guarded controller is within budget (predicted) whenever the static is."""
    from serving.controller import calibrated_static
    from serving.guard import BudgetGuard

    guarded = Controller.from_run(runs[name], estimator=AnalyticEstimator(), guard="expected")
    unguarded = Controller.from_run(runs[name], estimator=AnalyticEstimator(), guard=None)
    static, _ = calibrated_static(guarded, runs[name], [40.0, 80.0])
    guarded.guard.fallback = static.agent
    assert static.guard is None and guarded.guard.lengths == () and not guarded.guard.truncates
    seen = set()
    lo, hi = guarded.achievable_range_ms
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # budgets outside the range, on purpose
        for budget in (lo / 2, 40.0, (lo + hi) / 2, 80.0):
            for index in range(3):
                request = request_of("test", index, budget=f"{budget}ms")
                one, free, base = guarded.answer(request), unguarded.answer(request), static.answer(request)
                seen.add(one.guard)
                if one.guard == "kept":
                    assert one.knobs == free.knobs and one.predicted_ms <= budget
                elif one.guard == "replaced":
                    assert free.predicted_ms > budget >= one.predicted_ms
                else:
                    assert one.guard == "fallback" and one.knobs == base.knobs
                assert one.predicted_ms <= budget or base.predicted_ms > budget
    assert {"kept", "fallback"} <= seen
    # a policy that always asks for the full model, at a budget between the cheapest and the dearest
    # prediction: replaced by the dearest configuration predicted within budget, the greedy rule
    from agents import agent_class

    full = agent_class("static")()
    full.table = {80.0: [int(n) - 1 for n in guarded.env.trajectory_nvec]}
    dear = Controller(guarded.env, full, guard=BudgetGuard(guarded.env, static.agent))
    greedy = Controller.from_run(runs["greedy"], estimator=AnalyticEstimator(), guard=None)
    request = request_of("test", 0)
    expected, _, _ = dear.guard.latencies(guarded._sample(request))
    middle = f"{(expected.min() + expected.max()) / 2}ms"
    one = dear.answer(request_of("test", 0, budget=middle))
    other = greedy.answer(request_of("test", 0, budget=middle))  # ties may pick other knobs of the same latency
    assert one.guard == "replaced" and one.predicted_ms == pytest.approx(other.predicted_ms)
    assert one.predicted_ms <= one.budget_ms
    # with every answer length up to the generation cap, the bound holds on what the run is charged
    strict = Controller(guarded.env, guarded.agent, guard=BudgetGuard(guarded.env, static.agent, "every"))
    assert strict.guard.lengths == tuple(range(guarded.backend.max_new_tokens + 1))
    for index in range(2):
        one = strict.answer(request_of("test", index, budget=f"{hi}ms"))
        assert one.guard == "fallback" or one.estimated_ms <= hi
    with pytest.raises(ValueError, match="answer_lengths='longest' is invalid; accepted: truncate, expected, every"):
        BudgetGuard(guarded.env, answer_lengths="longest")


def test_the_default_guard_cuts_the_answer_where_the_budget_ends(runs, env):
    """``truncate`` (the default): a configuration priced within budget at the expected answer length is
    served, and its answer is cut at the longest length the budget affords, so what the run is charged
    (the estimator with its actual tokens) is within budget, where the ``expected`` guard serving the
    same configuration goes over when the model rambles. Per request the truncating controller is
    within budget (charged) whenever the calibrated static is."""
    from agents import agent_class
    from serving.controller import calibrated_static
    from serving.guard import BudgetGuard

    default = Controller.from_run(runs["grpo"], estimator=AnalyticEstimator())
    assert default.guard.truncates and default.guard.lengths == tuple(range(default.backend.max_new_tokens + 1))
    full = agent_class("static")()
    full.table = {80.0: [int(n) - 1 for n in default.env.trajectory_nvec]}  # always the full model
    cutting = Controller(default.env, full, guard=BudgetGuard(default.env))
    trusting = Controller(default.env, full, guard=BudgetGuard(default.env, answer_lengths="expected"))
    cut_seen = 0
    for index in range(4):
        request = request_of("test", index)
        sample = default._sample(request)
        expected, by_length, lengths = cutting.guard.latencies(sample)
        row = len(expected) - 1  # the full model: the last trajectory row
        n = int(lengths[row])
        if n >= default.backend.max_new_tokens:
            continue
        # a budget the expected length fits and one more token does not
        budget = float((np.maximum.accumulate(by_length[row])[n] + by_length[row, n + 1:].max()) / 2)
        if by_length[row, n + 1:].max() <= np.maximum.accumulate(by_length[row])[n]:
            continue
        one = cutting.answer(request_of("test", index, budget=f"{budget}ms"))
        other = trusting.answer(request_of("test", index, budget=f"{budget}ms"))
        assert one.guard == other.guard == "kept" and one.knobs == other.knobs
        assert one.estimated_ms <= budget
        assert other.answer.startswith(one.answer)  # the same greedy tokens, cut
        cut_seen += other.estimated_ms > budget
    assert cut_seen >= 1  # a random model rambles to the generation cap
    static, _ = calibrated_static(default, runs["grpo"], [40.0, 80.0])
    default.guard.fallback = static.agent
    lo, hi = default.achievable_range_ms
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for budget in (lo / 2, 40.0, (lo + hi) / 2, 80.0):
            for index in range(3):
                request = request_of("test", index, budget=f"{budget}ms")
                one, base = default.answer(request), static.answer(request)
                assert one.estimated_ms <= budget or base.estimated_ms > budget


def test_call_and_batch_forms(runs):
    controller = Controller.from_run(runs["grpo"], estimator=AnalyticEstimator())
    request = request_of("test", 3)
    one = controller(image=request.image, question=request.question, budget="0.08s",
                     question_type=request.question_type)
    assert one.score is None and one.budget_ms == 80.0  # no answers given: no score
    seen = []
    many = controller.batch([request_of("test", i) for i in range(3)], progress=seen.append)
    assert len(many) == 3 and seen == many and [a.id for a in many] == ["test-0", "test-1", "test-2"]
    assert controller.batch([request])[0].knobs == one.knobs
    default = controller(image=request.image, question=request.question)  # the run's budget
    assert default.budget_ms == 80.0


def test_budget_outside_the_range_warns_with_the_range(runs):
    controller = Controller.from_run(runs["greedy"], estimator=AnalyticEstimator())
    lo, hi = controller.achievable_range_ms
    with pytest.warns(UserWarning, match=r"achievable range .* is \d+\.\dms\.\.\d+\.\dms"):
        answer = controller.answer(request_of("test", 0, budget="5ms"))
    assert answer.warning is not None and f"{lo:.1f}ms..{hi:.1f}ms" in answer.warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert controller.answer(request_of("test", 0, budget=f"{(lo + hi) / 2:.1f}ms")).warning is None


def test_bad_requests_are_value_errors(runs):
    controller = Controller.from_run(runs["grpo"], estimator=AnalyticEstimator())
    request = request_of("test", 0)
    with pytest.raises(ValueError, match="no image"):
        controller(question="what color?", budget=BUDGET)
    with pytest.raises(ValueError, match="a range"):
        controller(image=request.image, question=request.question, budget="[40ms,80ms]")
    with pytest.raises(ValueError, match="invalid budget"):
        controller(image=request.image, question=request.question, budget="fast")
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        controller(image=np.zeros((4, 4), np.float32), question="what?")


def test_a_run_folder_is_data(runs, tmp_path, env, run_config):
    with pytest.raises(ControllerError, match="accepted: best, latest"):
        Controller.from_run(runs["grpo"], checkpoint="../../x")
    with pytest.raises(ControllerError, match="no checkpoints/best.safetensors"):
        Controller.from_run(tmp_path)
    # the agent comes from the registry by name; a "module" in the run's config is never imported
    run = tmp_path / "run"
    agent = make_agent("grpo", env)
    config = {**run_config, "agent": {"name": "grpo", "module": "serving_must_not_import_this"}}
    save_run_checkpoint(run / "checkpoints" / "best.safetensors", agent, env, config, step=1)
    assert Controller.from_run(run, estimator=AnalyticEstimator()).agent.name == "grpo"
    assert "serving_must_not_import_this" not in sys.modules
    with torch.no_grad():
        next(agent.policy.parameters()).fill_(float("nan"))
    import agents.checkpoint

    # a diverged checkpoint written by something else (knobgym itself refuses to save one)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(agents.checkpoint, "check_finite", lambda state, what: None)
        save_run_checkpoint(run / "checkpoints" / "best.safetensors", agent, env, config, step=2)
    with pytest.raises(ValueError, match="non-finite|NaN or inf"):  # ControllerError or the loader's CorruptFileError
        Controller.from_run(run, estimator=AnalyticEstimator())


# ---------------------------------------------------------------------------------------------- HTTP
def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(runs):
    """A real uvicorn server on an ephemeral localhost port, in a thread; stopped after the tests."""
    import socket

    import uvicorn

    from serving.http import create_app

    controller = Controller.from_run(runs["grpo"], estimator=AnalyticEstimator())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app_server = uvicorn.Server(uvicorn.Config(create_app(controller, max_image_bytes=100_000), log_level="warning"))
    thread = threading.Thread(target=app_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    import httpx

    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(200):  # until it accepts connections (at most ~10 s)
        try:
            httpx.get(f"{url}/health", timeout=1.0)
            break
        except httpx.TransportError:
            threading.Event().wait(0.05)
    yield url, controller
    app_server.should_exit = True
    thread.join(timeout=10)
    sock.close()
    assert not thread.is_alive()


def test_http_good_requests(server):
    import httpx

    url, controller = server
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["agent"] == "grpo" and health["budget_ms"] == 80.0
    request = request_of("test", 1)
    expected = controller.answer(request)
    uploaded = httpx.post(f"{url}/answer", files={"image": ("x.png", png_bytes(request.image), "image/png")},
                          data={"question": request.question, "budget": BUDGET, "type": request.question_type},
                          timeout=30)
    assert uploaded.status_code == 200, uploaded.text
    body = uploaded.json()
    assert body["knobs"] == expected.knobs and body["answer"] == expected.answer
    assert {"predicted_ms", "estimated_ms", "measured_ms", "within_budget", "budget_ms"} <= set(body)
    as_json = httpx.post(f"{url}/answer", json={"question": request.question, "budget": 80,
                                                "type": request.question_type,
                                                "image": base64.b64encode(png_bytes(request.image)).decode()},
                         timeout=30)
    assert as_json.status_code == 200 and as_json.json()["knobs"] == expected.knobs
    far = httpx.post(f"{url}/answer", json={"question": request.question, "budget": "5ms",
                                            "image": base64.b64encode(png_bytes(request.image)).decode()}, timeout=30)
    assert far.status_code == 200 and "achievable range" in far.json()["warning"]


def test_http_bad_requests_are_4xx_and_the_server_keeps_serving(server):
    import httpx

    url, _ = server
    request = request_of("test", 2)
    image64 = base64.b64encode(png_bytes(request.image)).decode()
    cases = [
        ({"json": {"image": image64, "budget": BUDGET}}, 400, "question"),
        ({"json": {"question": "what color?", "budget": BUDGET}}, 400, "no image"),
        ({"json": {"question": "what?", "image": base64.b64encode(b"not an image").decode()}}, 400, "cannot be read"),
        ({"json": {"question": "what?", "image": "%%%"}}, 400, "base64"),
        ({"json": {"question": "what?", "image": image64, "budget": "soon"}}, 400, "invalid budget"),
        ({"json": {"question": "what?", "image": image64, "budget": "[1ms,2ms]"}}, 400, "range"),
        ({"json": {"question": "what?", "image": image64, "colour": "red"}}, 400, "unknown field"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "accepted"),
        ({"files": {"image": ("x.png", b"\x89PNG broken", "image/png")}, "data": {"question": "what?"}}, 400,
         "cannot be read"),
        ({"files": {"image": ("x.png", b"0" * 100_001, "image/png")}, "data": {"question": "what?"}}, 413, "larger"),
    ]
    for kwargs, status, words in cases:
        response = httpx.post(f"{url}/answer", timeout=30, **kwargs)
        assert response.status_code == status, (kwargs.get("json"), response.text)
        assert words in response.json()["error"] and "\n" not in response.json()["error"]
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # still serving


# ---------------------------------------------------------------------------------------------- serve.py
def serve_cli(args: list[str], cwd: Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    # the timeout guards against a hang only: on a loaded 2-core VM the requests-file run took over 5 minutes
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    return subprocess.run([sys.executable, str(REPO / "serve.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory) -> Path:
    from backends.tiny.export_dataset import export_dataset

    return export_dataset(tmp_path_factory.mktemp("requests"), n=6, split="test")


def test_serve_bad_inputs_are_one_line_before_loading(runs, requests_file, tmp_path):
    """Every bad option, run folder or requests line is one UsageError/ValueError from parse_args, which
    loads no model; the command prints it as one line with exit status 2 (three cases run end to end)."""
    import serve

    bad_line = requests_file.parent / "bad.jsonl"
    bad_line.write_text(requests_file.read_text().splitlines()[0] + "\n{\"image\": \"images/nope.png\", "
                        "\"question\": \"what?\"}\n")
    run = str(runs["grpo"])
    cases = [([f"run={run}", "requests=x.jsonl", "colour=red"], "unknown option 'colour=red'"),
             ([f"requests={requests_file}"], "run= is missing"),
             ([f"run={tmp_path}", f"requests={requests_file}"], "has no checkpoints/best.safetensors"),
             ([f"run={run}", "checkpoint=older"], "checkpoint='older' is invalid"),
             ([f"run={run}"], "exactly one of requests="),
             ([f"run={run}", f"requests={requests_file}", "budget=fast"], "invalid budget 'fast'"),
             ([f"run={run}", f"requests={tmp_path / 'none.jsonl'}"], "does not exist"),
             ([f"run={run}", f"requests={bad_line}"], "line 2: image 'images/nope.png' cannot be read"),
             ([f"run={run}", "http.port=99999"], "http.port=99999 is invalid"),
             ([f"run={run}", f"requests={requests_file}", "guard=strict"],
              "guard='strict' is invalid; accepted: truncate, expected, every, off"),
             ([f"run={run}", f"requests={requests_file}", f"latency.profile={bad_line}"], "latency estimator")]
    for args, words in cases:
        with pytest.raises(ValueError) as caught:
            serve.parse_args(args)
        assert words in str(caught.value), args
    for args, words in (cases[0], cases[5], cases[7]):
        result = serve_cli(args, tmp_path, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and words in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr and not list(Path(run).glob("serve-*"))


def test_serve_answers_a_requests_file_with_an_slo_report(runs, requests_file, tiny_estimator, tmp_path):
    profile = tiny_estimator.save(tmp_path / "estimator.json")
    out = tmp_path / "served"
    result = serve_cli([f"run={runs['grpo']}", f"requests={requests_file}", "budget=80ms", f"out={out}",
                        f"latency.profile={profile}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    static = [json.loads(line) for line in (out / "static_answers.jsonl").read_text().splitlines()]
    assert len(answers) == len(static) == 6 and [a["id"] for a in answers] == [f"test-{i}" for i in range(6)]
    assert all(a["budget_ms"] == 80.0 and a["score"] is not None and a["knobs"]["tier"] for a in answers)
    report = json.loads((out / "report.json").read_text())
    rows = list(report["rows"].values())
    assert len(rows) == 2 and all(r["requests"] == 6 and 0 <= r["within_budget"] <= 1 for r in rows)
    assert all(r["mean_score"] is not None and r["latency_p95_ms"] >= r["latency_p50_ms"] for r in rows)
    assert "| static (calibrated by the run) | 6 |" in (out / "report.md").read_text()
    guard = report["rows"][next(iter(report["rows"]))]["guard"]  # the controller's row: guarded by default
    assert sum(guard.values()) == 6 and all(a["guard"] in ("kept", "replaced", "fallback") for a in answers)
    assert "static calibrated here at 80ms" in (out / "report.md").read_text()  # the in-process run has none


@pytest.mark.parametrize("script", ["serve.py", "evaluate.py"])
def test_a_run_whose_hf_model_is_missing_here_is_one_line_before_loading(tmp_path, script):
    """A foreign run folder recording ``backend=hf`` with a model this machine lacks: one error line,
    exit 2, and no 'loading ...' phase line before it (the backend's cheap check runs first)."""
    import subprocess
    import sys

    import torch

    from agents.checkpoint import write_checkpoint

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "data.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    config = {"env": {"id": "MultiKnob-v0"}, "budget": "80ms", "agent": {"name": "static"},
              "backend": {"name": "hf", "model": str(tmp_path / "gone-model"), "dataset": str(tmp_path / "data.jsonl")}}
    run = tmp_path / "run"
    write_checkpoint(run / "checkpoints" / "best.safetensors", "static", "MultiKnob-v0",
                     {"w": torch.zeros(1)}, {"config": config})
    args = [f"run={run}"] + (["requests=" + str(tmp_path / "data.jsonl")] if script == "serve.py" else [])
    proc = subprocess.run([sys.executable, str(repo / script), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "gone-model' does not exist" in lines[0], lines
