"""The tiny text LM v2 training script: a run split by an interruption resumes to the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from backends.tiny_text import train_v2

TINY = ["--hidden", "16", "--layers", "1", "--heads", "2", "--context", "32", "--max-positions", "64",
        "--vocab-size", "300", "--batch-size", "2", "--steps", "4", "--warmup", "1", "--max-corpus-chars", "1500",
        "--threads", "1", "--log-every", "1", "--corpus", "listed", "--eval-max-tokens", "64"]


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, capsys):
    assert train_v2.main(TINY + ["--work-dir", str(tmp_path / "straight")]) == 0
    split = TINY + ["--work-dir", str(tmp_path / "split")]
    assert train_v2.main(split + ["--max-steps-this-run", "2"]) == 0
    assert not (tmp_path / "split" / "final").exists()
    _, metadata = train_v2.load_tensors(tmp_path / "split" / "latest" / train_v2.STATE_FILE)
    assert metadata["step"] == 2 and metadata["args"]["hidden"] == 16
    assert train_v2.main(split) == 0
    assert "resumed from" in capsys.readouterr().out
    straight = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "split" / "final" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    card = json.loads((tmp_path / "split" / "final" / "training.json").read_text())
    assert card["context"] == 32 and card["held_out_ppl"] > 1
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "split" / "final")
    assert tokenizer("x = 1")["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|endoftext|>")  # the sink


def test_resuming_with_other_arguments_is_one_error_line(tmp_path, capsys):
    work = ["--work-dir", str(tmp_path)]
    assert train_v2.main(TINY + work + ["--max-steps-this-run", "1"]) == 0
    capsys.readouterr()
    assert train_v2.main(TINY[:-2] + ["--eval-max-tokens", "64", "--hidden", "32"] + work) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --hidden=32 differs from the checkpoint") and "--fresh" in err and "\n" not in err
    assert train_v2.main(TINY + work + ["--fresh", "--steps", "1"]) == 0


def test_a_later_stage_starts_from_the_previous_final_weights(tmp_path, capsys):
    assert train_v2.main(TINY + ["--work-dir", str(tmp_path / "one")]) == 0
    first = tmp_path / "one" / "final"
    two = TINY + ["--work-dir", str(tmp_path / "two"), "--init-from", str(first), "--seed", "1", "--lr", "1e-9"]
    assert train_v2.main(two) == 0
    before, after = load_file(first / "model.safetensors"), load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)  # a vanishing lr: the same weights
    card = json.loads((tmp_path / "two" / "final" / "training.json").read_text())
    assert card["init_from"] == str(first) and card["seed"] == 1
    assert train_v2.main(TINY + ["--work-dir", str(tmp_path / "three"), "--hidden", "32",
                                 "--init-from", str(first)]) == 2
    assert "does not fit this run's shape" in capsys.readouterr().err
    assert train_v2.main(TINY + ["--work-dir", str(tmp_path / "four"), "--init-from", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_the_v2_corpus_is_the_whole_standard_library_without_its_tests():
    from backends.tiny_text import corpus

    listed, everything = corpus.training_documents(), corpus.training_documents(all_stdlib=True)
    assert sum(map(len, everything)) > 5 * sum(map(len, listed)) and len(everything) > len(listed)
    assert sum(map(len, everything)) <= corpus.STDLIB_CHAR_CAP + sum(map(len, corpus.PYDOC_TOPICS.values()))
    held_out = set(corpus.held_out_documents().values())
    assert not held_out & set(everything)
    assert not any("import unittest" in d and "class Test" in d and "support" in d[:2000] for d in everything[-50:])


def test_seeded_sink_takes_the_attention_and_gives_a_zero_value():
    """seed_attention_sink: at initialisation every head of every layer puts most of its attention on
    the BOS at any distance, the BOS's value is the value bias, and logit 0 changes nothing."""
    from transformers import GPTNeoXForCausalLM

    from backends.tiny_text.train import build_config

    args = train_v2.parse_args(["--hidden", "64", "--layers", "3", "--heads", "2", "--context", "512"])
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(build_config(300, 0, args))
    untouched = {k: v.clone() for k, v in model.state_dict().items()}
    train_v2.seed_attention_sink(model, 0, 0.0)
    assert all(torch.equal(untouched[k], v) for k, v in model.state_dict().items())
    train_v2.seed_attention_sink(model, 0, 16.0)
    model.set_attn_implementation("eager")
    ids = torch.cat([torch.zeros(1, 1, dtype=torch.long), torch.randint(1, 300, (1, 511))], dim=1)
    with torch.no_grad():
        output = model(ids, output_attentions=True, output_hidden_states=True)
    on_bos = torch.stack([layer[0, :, 1:, 0] for layer in output.attentions])  # (layers, heads, queries)
    assert on_bos.min() > 0.5 and on_bos[:, :, -1].mean() > 0.9, on_bos.mean(-1)
    hidden, head_dim = 64, 32
    for layer in model.gpt_neox.layers:
        weight = layer.attention.query_key_value.weight.view(2, 3, head_dim, hidden)
        assert torch.all(weight[:, 2, :, hidden - 1] == 0)  # values do not read the sink dimension
    first_token = model.get_input_embeddings().weight[0]
    assert first_token[-1] == train_v2.SINK_ACTIVATION and torch.all(first_token[:-1] == 0)


def test_a_checkpoint_from_before_sink_logit_resumes_as_unseeded(tmp_path, capsys):
    work = ["--work-dir", str(tmp_path)]
    assert train_v2.main(TINY + work + ["--max-steps-this-run", "1"]) == 0
    path = tmp_path / "latest" / train_v2.STATE_FILE
    tensors, metadata = train_v2.load_tensors(path)
    del metadata["args"]["sink_logit"]  # a checkpoint written before the option existed
    train_v2.save_tensors(path, tensors, metadata)
    assert train_v2.main(TINY + work) == 0
    assert "resumed from" in capsys.readouterr().out
    assert train_v2.main(TINY + work + ["--fresh", "--max-steps-this-run", "1", "--sink-logit", "8",
                                        "--overwrite"]) == 0
    assert train_v2.main(TINY + work + ["--overwrite"]) == 2  # the seeded checkpoint is not resumed unseeded
    err = capsys.readouterr().err
    assert "--sink-logit=0.0 differs from the checkpoint" in err and "(8.0); accepted" in err
    with pytest.raises(SystemExit) as exit_info:  # a seed that the stage's weights would overwrite
        train_v2.main(TINY + work + ["--init-from", str(tmp_path / "final"), "--sink-logit", "8"])
    assert exit_info.value.code == 2 and "--init-from would overwrite it" in capsys.readouterr().err


def test_a_pinned_sink_is_as_seeded_after_training(tmp_path):
    """--pin-sink: after training steps every entry the seed writes is back to its seeded value, the sink
    dimension is the BOS's alone (no block writes to it)."""
    work, out = tmp_path / "work", tmp_path / "final"
    args = TINY + ["--work-dir", str(work), "--out", str(out), "--sink-logit", "8", "--pin-sink"]
    assert train_v2.main(args) == 0
    from transformers import GPTNeoXForCausalLM

    trained = GPTNeoXForCausalLM.from_pretrained(out)
    bos = trained.config.bos_token_id
    reference = {k: v.clone() for k, v in trained.state_dict().items()}
    train_v2.seed_attention_sink(trained, bos, 8.0, pinned=True)
    assert all(torch.equal(reference[k], v) for k, v in trained.state_dict().items())  # nothing to put back
    for layer in trained.gpt_neox.layers:
        assert torch.all(layer.attention.dense.weight[-1] == 0) and torch.all(layer.mlp.dense_4h_to_h.weight[-1] == 0)


def test_pin_sink_without_a_seed_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_v2.parse_args(TINY + ["--pin-sink"])
    assert exit_info.value.code == 2 and "--pin-sink keeps a seeded sink and --sink-logit is 0" in capsys.readouterr().err
