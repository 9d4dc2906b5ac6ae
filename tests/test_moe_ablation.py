"""bench/moe_ablation.py: accuracy with the MoE MLPs zeroed, on the shipped checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import moe_ablation  # noqa: E402


def test_zeroing_the_moe_mlps_costs_accuracy_and_the_hooks_are_removed(capsys):
    assert moe_ablation.main(["--samples", "12"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    labels = [line[:32].strip() for line in lines]
    scores = [float(line[32:].split()[0]) for line in lines]
    assert labels == ["full", "MoE MLPs of blocks 2-16 zeroed", "MoE MLPs of blocks 2-8 zeroed",
                      "MoE MLPs of blocks 9-16 zeroed"]  # the shipped checkpoint has 16 blocks
    assert scores[1] < scores[0]  # the v1 MoE blocks carry computation (75.0 -> 58.3 on these 12)
    # the hooks are removed: running again gives the same full-configuration score
    assert moe_ablation.main(["--samples", "12"]) == 0
    assert float(capsys.readouterr().out.splitlines()[0][32:].split()[0]) == scores[0]


def test_bad_options_exit_2_with_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        moe_ablation.main(["--samples", "0"])
    assert exc.value.code == 2 and capsys.readouterr().err.strip().count("\n") == 0
    with pytest.raises(SystemExit) as exc:
        moe_ablation.main(["--model", str(tmp_path)])
    assert exc.value.code == 2 and "--model=" in capsys.readouterr().err
