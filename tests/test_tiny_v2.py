"""The tiny model v2: its task (backends.tiny.data_v2) and its resumable elastic training."""

from __future__ import annotations

import json

import pytest
import torch

from backends.tiny import data_v2
from backends.tiny.model import answer_ids, build_tokenizer
from backends.tiny.tasks import checkpoint_task, task_module
from backends.tiny.train_v2 import main, parse_args, state_paths, train

TINY_RUN = ["--batch-size", "2", "--steps", "4", "--warmup", "1", "--val-every", "1000", "--val-samples", "4",
            "--threads", "1", "--log-every", "1"]


def test_samples_are_pure_functions_of_split_index_seed():
    a, b = data_v2.make_sample("test", 7), data_v2.make_sample("test", 7)
    assert a.question == b.question and a.reference == b.reference and (a.image == b.image).all()
    assert data_v2.make_sample("validation", 7).question != a.question or \
        not (data_v2.make_sample("validation", 7).image == a.image).all()


def test_every_question_type_occurs_and_every_answer_is_one_known_token():
    tokenizer = build_tokenizer(data_v2.vocabulary())
    samples = data_v2.generate_split("train", 300)
    assert {s.question_type for s in samples} == set(range(len(data_v2.QUESTION_TYPES)))
    for s in samples:
        assert len(answer_ids(tokenizer, s.reference)) == 2, s.reference  # the answer and <eos>
        assert tokenizer.unk_token_id not in tokenizer(s.question)["input_ids"], s.question


def test_checkpoint_task_reads_the_config(tmp_path):
    assert checkpoint_task(tmp_path) is task_module("v1")  # no config.json: the loader reports it
    (tmp_path / "config.json").write_text(json.dumps({"knobgym": {"task": "v2"}}))
    assert checkpoint_task(tmp_path) is data_v2
    (tmp_path / "config.json").write_text(json.dumps({"knobgym": {"task": "v9"}}))
    with pytest.raises(ValueError, match="v9"):
        checkpoint_task(tmp_path)


def _weights(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_a_stopped_and_resumed_run_equals_an_unstopped_one(tmp_path):
    straight = train(parse_args(TINY_RUN + ["--out", str(tmp_path / "a")]))
    assert straight.step == 4
    first = train(parse_args(TINY_RUN + ["--out", str(tmp_path / "b"), "--session-steps", "2"]))
    assert first.step == 2 and [p.name for p in state_paths(tmp_path / "b")] == ["step-00000002.pt"]
    resumed = train(parse_args(TINY_RUN + ["--out", str(tmp_path / "b")]))
    assert resumed.step == 4
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.opt.state_dict()["state"][0]["step"] == resumed.opt.state_dict()["state"][0]["step"]
    # the exported model loads like any checkpoint and names its task
    assert checkpoint_task(tmp_path / "b" / "model") is data_v2
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log] == [4] and set(log[0]["val"]) >= {"full", "cheapest"}


def test_export_to_writes_the_newest_state_as_a_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    main(TINY_RUN + ["--out", out, "--session-steps", "1"])
    main(TINY_RUN + ["--out", out, "--export-to", str(tmp_path / "look")])
    state = json.loads((tmp_path / "look" / "training_state.json").read_text())
    assert state["step"] == 1 and checkpoint_task(tmp_path / "look") is data_v2
    # it loads as the tiny backend over the v2 task, tiers resizing the image before the tower
    from backends.tiny.backend import load_tiny_backend

    backend = load_tiny_backend(str(tmp_path / "look"))
    space = backend.knob_space
    assert space.tier_mode == "resize" and space.tiers == {"low": 4, "medium": 16, "high": 64}
    assert space.tier_sizes == {"low": 12, "medium": 24, "high": 48}
    assert backend.question_types == data_v2.QUESTION_TYPES
    outcome = backend.run(backend.samples("test")[0], space.cheapest())
    assert outcome.token_counts.new_tokens >= 1


def test_a_state_cut_short_is_skipped_for_the_previous_one(tmp_path):
    out = tmp_path / "run"
    train(parse_args(TINY_RUN + ["--out", str(out), "--session-steps", "1"]))
    train(parse_args(TINY_RUN + ["--out", str(out), "--session-steps", "1"]))
    older, newest = state_paths(out)
    newest.write_bytes(newest.read_bytes()[:100])  # a crash that bypassed the atomic write
    resumed = train(parse_args(TINY_RUN + ["--out", str(out), "--session-steps", "1"]))
    assert resumed.step == 2  # restarted from step 1, then one step


def test_a_resume_with_other_options_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    main(TINY_RUN + ["--out", out, "--session-steps", "1"])
    with pytest.raises(SystemExit) as exc:
        main(["--batch-size", "3"] + TINY_RUN[2:] + ["--out", out])
    assert exc.value.code == 2
    assert "batch_size: saved 2, given 3" in capsys.readouterr().err


def test_a_later_stage_starts_from_another_runs_weights_with_its_own_schedule(tmp_path, capsys):
    first = train(parse_args(TINY_RUN + ["--out", str(tmp_path / "a")]))
    later = train(parse_args(TINY_RUN + ["--out", str(tmp_path / "b"), "--init-from", str(tmp_path / "a"),
                                         "--steps", "1", "--full-share", "1", "--full-depth-weight", "4"]))
    assert later.step == 1 and later.opt.state_dict()["state"][0]["step"] == 1  # fresh optimiser and step count
    assert later.exit_weights[-1] == pytest.approx(4 / (len(later.space.depths) - 1 + 4))
    # one step away from the first run's weights, not from a fresh initialisation
    a, b = _weights(first), _weights(later)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.05
    # resuming the later stage continues its own state (the init is not applied again)
    again = train(parse_args(TINY_RUN + ["--out", str(tmp_path / "b"), "--init-from", str(tmp_path / "a"),
                                         "--steps", "1", "--full-share", "1", "--full-depth-weight", "4"]))
    assert again.step == 1 and all(torch.equal(v, _weights(again)[k]) for k, v in b.items())
    with pytest.raises(SystemExit) as exc:
        main(TINY_RUN + ["--out", str(tmp_path / "c"), "--init-from", str(tmp_path / "nothing")])
    assert exc.value.code == 2 and "--init-from=" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before anything is written


@pytest.mark.parametrize("option", [["--checkpoint-minutes", "11"], ["--checkpoint-minutes", "0"],
                                    ["--full-share", "1.5"], ["--steps", "0"], ["--full-depth-weight", "-1"],
                                    ["--init-from", "x", "--stage2-at", "5"], ["--min-top-k", "9"],
                                    ["--min-top-k", "0"]])
def test_bad_options_exit_2_with_one_line(option, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(option)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and option[0] in err[0]


@pytest.mark.slow
def test_headroom_prints_a_row_per_budget_and_per_type_never_below_best_static_on_test(capsys, monkeypatch):
    """bench/headroom.py on the default backend with the analytic stand-in estimator."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "tests"))
    monkeypatch.syspath_prepend(str(root / "bench"))
    import headroom

    headroom.main(["--samples", "4", "--estimator", "fake_latency:make", "--budgets", "60ms,90ms"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "ms |" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| 60.0 ms", "| 90.0 ms"]
    for row in rows:
        static, per_type, oracle, best_static = (float(v) for v in row.split(" | ")[1:5])
        assert oracle >= max(per_type, best_static) >= 0 and oracle >= static
    assert "at 90.0 ms: static tier=" in out
    del sys.modules["headroom"]


def test_headroom_rejects_bad_options_in_one_line(capsys):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for bad in (["--samples", "0"], ["--budgets", "fast"]):
        proc = subprocess.run([sys.executable, str(root / "bench" / "headroom.py"), *bad], capture_output=True,
                              text=True, cwd=root)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_two_training_stages_draw_what_the_model_card_says():
    """Stage 1 (the reference run's first 7158 steps): the first 7 question types, 8 experts of 192
    units, exits from depth 3, top-k uniform; stage 2: every type, 16 experts of 96, the depth-2 exit,
    top-k drawn in proportion to k."""
    import numpy as np

    from backends.knobs import KnobSpace
    from backends.tiny.train_v2 import V2_SHAPE, V2_STAGE1_SHAPE, Trainer, draw_knobs, parse_args

    stage1 = {data_v2.make_sample("train", i, n_types=data_v2.FIRST_STAGE_TYPES).question_type for i in range(400)}
    assert stage1 == set(range(data_v2.FIRST_STAGE_TYPES))
    assert data_v2.QUESTION_TYPES[data_v2.FIRST_STAGE_TYPES:] == ("relation_value",)
    trainer = Trainer.__new__(Trainer)
    trainer.args = parse_args(["--stage2-at", "10"])
    assert trainer.stage(9) == 1 and trainer.stage(10) == 2
    assert V2_STAGE1_SHAPE.depths == (3, 4, 5, 6, 7, 8) and V2_SHAPE.depths == (2, 3, 4, 5, 6, 7, 8)
    assert V2_STAGE1_SHAPE.num_experts * V2_STAGE1_SHAPE.expert_size == V2_SHAPE.num_experts * V2_SHAPE.expert_size
    space = KnobSpace(model_class="tiny", tiers={"low": 4, "medium": 16, "high": 64}, top_ks=V2_SHAPE.top_ks,
                      full_top_k=8, num_experts=16, depths=V2_SHAPE.depths, num_layers=8)
    draws = [draw_knobs(np.random.default_rng([0, s]), space, 0.0, stage=2).top_k for s in range(4000)]
    share = np.array([np.mean(np.array(draws) == k) for k in V2_SHAPE.top_ks])
    assert np.allclose(share, np.array(V2_SHAPE.top_ks) / sum(V2_SHAPE.top_ks), atol=0.03)
    uniform = [draw_knobs(np.random.default_rng([0, s]), space, 0.0, stage=1).top_k for s in range(4000)]
    assert np.allclose([np.mean(np.array(uniform) == k) for k in V2_SHAPE.top_ks], 0.25, atol=0.03)
    # a later stage may leave the low top-k untrained: only 4 and 8, still in proportion to k
    high = [draw_knobs(np.random.default_rng([0, s]), space, 0.0, stage=2, min_top_k=4).top_k for s in range(3000)]
    assert set(high) == {4, 8} and abs(np.mean(np.array(high) == 8) - 2 / 3) < 0.03


def test_upcycling_to_fine_grained_experts_keeps_the_function(tmp_path):
    """split_experts: the stage-2 model at top-2k computes what the stage-1 model did at top-k
    (every exit's loss equal), and a run that crosses the switch resumes across it exactly."""
    import torch

    from backends.knobs import KnobConfig, apply_knobs
    from backends.tiny.train import exit_losses, make_batch
    from backends.tiny.train_v2 import V2_SHAPE, V2_STAGE1_SHAPE, Trainer, parse_args

    trainer = Trainer(parse_args(["--stage2-at", "1", "--batch-size", "4", "--out", str(tmp_path)]))
    assert trainer.shape is V2_STAGE1_SHAPE
    trainer.train_step()  # one stage-1 step: the AdamW moments are not empty
    samples = [data_v2.make_sample("validation", i) for i in range(6)]
    batch = make_batch(samples, trainer.tokenizer, 64)
    trainer.model.eval()
    with torch.no_grad(), apply_knobs(trainer.model, KnobConfig(tier="high", top_k=2), trainer.space):
        before = exit_losses(trainer.model, trainer.parts, *batch, V2_STAGE1_SHAPE.depths)
    trainer.upcycle()
    assert trainer.shape is V2_SHAPE and trainer.space.top_ks == V2_SHAPE.top_ks
    trainer.model.eval()
    with torch.no_grad(), apply_knobs(trainer.model, KnobConfig(tier="high", top_k=4), trainer.space):
        after = exit_losses(trainer.model, trainer.parts, *batch, V2_STAGE1_SHAPE.depths)
    assert torch.allclose(torch.stack(before), torch.stack(after), atol=1e-5)
    moments = trainer.opt.state_dict()["state"]
    params = list(trainer.model.parameters()) + list(trainer.patch_head.parameters())
    assert moments and all(st["exp_avg"].shape == st["exp_avg_sq"].shape == params[i].shape for i, st in moments.items())
    trainer.train_step()  # and stage 2 trains on from there
