"""bench.gpu_check without a GPU: it validates its configuration, prints its plan, and stops with
one "needs CUDA" line (exit 3) before creating anything; bad options are one line, exit 2."""

from __future__ import annotations

import pytest
import torch

from bench import gpu_check

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def test_without_cuda_it_validates_plans_and_stops_with_one_line(tmp_path, capsys):
    out = tmp_path / "gpu-run"
    assert gpu_check.main(["--out", str(out)]) == gpu_check.NEEDS_CUDA_EXIT
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "needs CUDA" in captured.err and "Traceback" not in captured.err
    plan = captured.out.splitlines()
    assert [line.split(":")[0] for line in plan] == list(gpu_check.GPU_MODELS)
    assert "7.06 B parameters; bf16, nf4, int8; MultiKnob-v0 episode per tier" in plan[0]
    assert "latency profile (nf4" in plan[0] and "latency profile (bf16" in plan[2]
    assert plan[4].startswith("qwen3-vl-2b: ") and plan[4].endswith("; bf16, nf4, int8")
    assert plan[5].startswith("qwen3-vl-30b-a3b-nf4: ") and "; nf4; decoder blocks capped by 20 GB" in plan[5]
    assert not out.exists()  # nothing half-made


def test_a_subset_is_planned(tmp_path, capsys):
    assert gpu_check.main(["--models", "pythia-2.8b", "--quantizations", "bf16", "--out", str(tmp_path / "o")]) == 3
    assert capsys.readouterr().out.splitlines() == ["pythia-2.8b: 2.78 B parameters; bf16"]


@pytest.mark.parametrize("argv, message", [
    (["--models", "llava-1.5-7b,bert"], "unknown model(s) ['bert']"),
    (["--quantizations", "nf4,fp8"], "--quantizations='nf4,fp8' is invalid"),
    (["--profile-points", "1"], "points=1 is invalid"),
    (["--profile-repeats", "x"], "invalid int value: 'x'"),
    (["--max-new-tokens", "0"], "--max-new-tokens=0 is invalid"),
    (["--gpu", "0"], "unrecognized arguments: --gpu 0"),
])
def test_bad_options_are_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert gpu_check.main(argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_an_existing_output_folder_is_refused(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_the_gpu_path_runs_end_to_end_with_cuda_calls_on_the_cpu(tmp_path, monkeypatch, capsys):
    """Everything after the first CUDA call, at reduced scale on the CPU: the CUDA timing and memory
    calls are replaced by no-ops and the per-tier episodes and profiles run in bf16, so the
    orchestration (loading, checks, env episodes, profiles, estimator, report, output folder) is
    covered without a GPU."""
    from bench import full_size as fs

    write = fs.write_checkpoint
    monkeypatch.setattr(fs, "write_checkpoint", lambda arch, out, scale=1.0, seed=0, blocks=None: write(arch, out, 0.05, seed,
                                                                                              blocks))
    monkeypatch.setattr(gpu_check, "require_cuda", lambda: torch.device("cpu"))
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "cpu stand-in")
    monkeypatch.setattr(gpu_check, "TIER_EPISODES", ("llava-1.5-7b", "bf16"))
    monkeypatch.setattr(gpu_check, "PROFILED", (("llava-1.5-7b", "bf16"),))
    out = tmp_path / "gpu-run"
    rc = gpu_check.main(["--models", "llava-1.5-7b", "--quantizations", "bf16", "--out", str(out),
                         "--profile-points", "8", "--profile-repeats", "1", "--max-new-tokens", "2"])
    table = capsys.readouterr().out
    assert rc == 0, table
    assert {p.name for p in out.iterdir()} == {"results.json", "table.md", "profile-llava-1.5-7b-bf16.csv",
                                               "profile-llava-1.5-7b-bf16-report.json",
                                               "estimator-llava-1.5-7b-bf16.bin"}
    assert "stage 1, tier low" in table and "TokenBudget-v0 highest" in table and "latency profile 8 points" in table
