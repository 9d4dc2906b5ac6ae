"""bench.sink_emergence: the Bigram-Backcopy rows have the structure the bench claims, and the bench runs."""

from __future__ import annotations

import numpy as np
import pytest

from bench import sink_emergence

TINY = ["--hidden", "16", "--layers", "1", "--heads", "2", "--context", "64", "--vocab-size", "300",
        "--max-corpus-chars", "1500", "--corpus", "listed", "--steps", "2", "--threads", "1", "--eval-tokens", "64",
        "--from-position", "40", "--attention-from", "16", "--windows", "8", "16", "--bb-vocab", "16"]


def test_every_trigger_is_followed_by_the_token_before_it():
    vocab, triggers = np.arange(10, 26), np.array([3, 4])
    task = sink_emergence.BigramBackcopy(vocab, triggers, rate=0.2, bos_id=0)
    rows = [task.row(np.random.default_rng([1, i]), 300) for i in range(5)]
    assert rows[0] == task.row(np.random.default_rng([1, 0]), 300)  # a function of the generator's seed
    n_triggers = 0
    for row in rows:
        assert len(row) == 300 and row[0] == 0 and 0 not in row[1:]
        assert set(row[1:]) <= set(vocab.tolist()) | {3, 4}
        for i in range(2, len(row) - 1):
            if row[i] in (3, 4):
                n_triggers += 1
                assert row[i + 1] == row[i - 1] and row[i - 1] not in (3, 4)
    assert 0.08 < n_triggers / (5 * 300) < 0.2  # about rate / (1 + rate) of the tokens are triggers


@pytest.mark.parametrize("sink", [[], ["--sink-logit", "8", "--pin-sink"]])
def test_the_bench_trains_and_prints_both_tables(sink, capsys):
    assert sink_emergence.main(TINY + sink) == 0
    out = capsys.readouterr().out
    assert "held-out documents (5 x 64 tokens)" in out and "synthetic rows (4 x 64 tokens)" in out
    assert out.count("window only / SinkWindow: W=8 ") == 2 and "| 0 | " in out


@pytest.mark.parametrize("bad, named", [(["--share", "2"], "--share=2.0"), (["--windows", "50"], "--windows=[50]"),
                                        (["--trigger-rate", "0"], "--trigger-rate=0.0")])
def test_a_bad_option_is_one_line_and_exit_2(bad, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        sink_emergence.main(TINY + bad)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert named in err


def test_eval_tokens_longer_than_every_held_out_document_is_one_line(capsys):
    args = TINY[:TINY.index("--eval-tokens")] + ["--eval-tokens", "100000"] + TINY[TINY.index("--eval-tokens") + 2:]
    assert sink_emergence.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --eval-tokens=100000 is longer than every held-out document") and "\n" not in err
