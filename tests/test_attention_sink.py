"""``bench.attention_sink``: the first token's attention weight per layer (StreamingLLM's sink)."""

from __future__ import annotations

import pytest

from backends.tiny_text import load_tiny_text_model
from bench import attention_sink


def test_the_attention_sink_bench_prints_one_row_per_layer_against_uniform(capsys):
    attention_sink.main(["--tokens", "64", "--from-position", "16"])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and line[2:3].isdigit()]
    assert len(rows) == load_tiny_text_model()[0].config.num_hidden_layers
    uniform = sum(1 / (p + 1) for p in range(16, 64)) / 48
    for row in rows:
        weight, listed_uniform = float(row[2]), float(row[3])
        assert 0 <= weight <= 1 and listed_uniform == pytest.approx(uniform, abs=5e-5)


def test_the_attention_sink_bench_rejects_a_start_past_the_tokens(capsys):
    with pytest.raises(SystemExit) as exit_info:
        attention_sink.main(["--tokens", "5", "--from-position", "9"])
    assert exit_info.value.code == 2 and "--from-position=9" in capsys.readouterr().err
