"""KV envs on the user's text (HF datasets: text, JSON lines, save_to_disk) and a model spec as the HF backend takes."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

import backends.kv.sources as sources
from backends.kv.sources import read_text_documents
from backends.tiny_text import CHECKPOINT_DIR
from backends.vqa_data import DataError
from envs.streaming_kv import StreamingKVEnv

TPOT = {"base_ms": 1.0, "per_slot_ms": 0.001, "per_prune_ms": 0.1}
TEXT = "def f(x):\n    return x + 1\n\nThe quick brown fox jumps over the lazy dog. " * 40


def test_text_jsonl_and_save_to_disk_give_the_same_documents(tmp_path):
    (tmp_path / "doc.txt").write_text(TEXT)
    assert read_text_documents(tmp_path / "doc.txt") == [TEXT]
    rows = [{"body": TEXT, "id": 1}, {"body": "  ", "id": 2}, {"body": TEXT[:100], "id": 3}]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert read_text_documents(str(tmp_path / "docs.jsonl"), "body") == [TEXT, TEXT[:100]]  # blank rows dropped
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows[2:])}).save_to_disk(str(tmp_path / "saved"))
    assert read_text_documents(str(tmp_path / "saved"), "body") == [TEXT, TEXT[:100]]


@pytest.mark.parametrize("make, message", [
    (lambda p: read_text_documents(p / "missing.txt"), "dataset file '.*missing.txt' does not exist"),
    (lambda p: read_text_documents(p / "nothing"), "dataset '.*nothing' does not exist; accepted: a text file"),
    (lambda p: read_text_documents(p / "docs.jsonl", "content"),
     "text_column='content' is not a column of dataset '.*docs.jsonl'; accepted: body, id"),
    (lambda p: read_text_documents(p / "docs.jsonl", "id"), "row 0 column 'id' is int, not text"),
    (lambda p: read_text_documents(p / "empty.txt"), "holds no text"),
    (lambda p: read_text_documents(""), "dataset='' is invalid"),
])
def test_bad_documents_are_one_line_data_errors(tmp_path, make, message):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": TEXT, "id": 1}) + "\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match=message) as error:
        make(tmp_path)
    assert "\n" not in str(error.value)


def test_bad_dataset_fails_before_the_model_loads(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the dataset was checked")

    monkeypatch.setattr("envs.streaming_kv.load_kv_model", no_loading)
    with pytest.raises(DataError, match="text_column='text' is not a column"):
        (tmp_path / "docs.jsonl").write_text(json.dumps({"body": TEXT}) + "\n")
        StreamingKVEnv(dataset=str(tmp_path / "docs.jsonl"), tpot_model=TPOT)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_env_streams_user_text_with_a_model_spec(tmp_path, precision):
    (tmp_path / "notes.txt").write_text(TEXT * 3)
    env = StreamingKVEnv(model_spec={"model": str(CHECKPOINT_DIR), "precision": precision, "device": "cpu"},
                         dataset=str(tmp_path / "notes.txt"), episode_tokens=64, chunk_tokens=32, tpot_model=TPOT,
                         budget="1.06ms")
    assert str(next(env.model.parameters()).dtype) == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[precision]
    obs, info = env.reset(seed=0)
    obs, reward, terminated, _, info = env.step(np.zeros(len(env.knob_names), dtype=np.int64))
    assert np.isfinite(reward) and np.isfinite(info["mean_nll"]) and info["mean_nll"] < 8.0  # the model knows text


def test_model_spec_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="precision='fp8' is invalid; accepted: fp32, fp16, bf16"):
        sources.load_kv_model(model_spec={"model": str(CHECKPOINT_DIR), "precision": "fp8"})
    with pytest.raises(ValueError, match="local model path '.*nowhere' does not exist"):
        sources.load_kv_model(model_spec=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="model_path and model_spec were both given"):
        sources.load_kv_model(model_path="a", model_spec="b")
    with pytest.raises(ValueError, match="storage='ring' is invalid; accepted: slots, static, concat"):
        StreamingKVEnv(storage="ring", tpot_model=TPOT)


@pytest.mark.slow
def test_long_episodes_of_2k_tokens_on_held_out_documents():
    """Episodes of 2048 tokens per document window on the shipped held-out documents, in every split."""
    env = StreamingKVEnv(episode_tokens=2048, chunk_tokens=512, tpot_model=TPOT, budget="1.1ms")
    sizes = env.split_sizes()
    assert all(sizes[split] >= 2 for split in ("train", "validation", "test")), sizes
    env.reset(seed=0, options={"split": "test", "sample_id": 0})
    done, steps = False, 0
    while not done:
        _, reward, done, _, info = env.step(np.array([1, 2, 0]))  # SinkWindow(4, 128), compress_every=1
        steps += 1
    assert steps == 4 and np.isfinite(info["episode_reward"]) and max(info["cache_length"]) == 129


def test_every_episode_starts_with_the_tokenizers_bos(tmp_path):
    """A tokenizer that puts a BOS before every text (Llama's <s>, the text LM v2's <|endoftext|>): each
    episode streams that BOS, then document tokens, as a new document's stream would (the sink
    StreamingLLM keeps); windows still tile the document without overlap and predict episode_tokens."""
    import shutil

    from transformers import PreTrainedTokenizerFast

    from backends.tiny_text.train import EOS_TOKEN
    from backends.tiny_text.train_v2 import with_bos
    from envs.kv_data import stream_prefix

    folder = tmp_path / "bos_model"
    shutil.copytree(CHECKPOINT_DIR, folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    bos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    with_bos(tokenizer, bos).save_pretrained(folder)
    (tmp_path / "notes.txt").write_text(TEXT * 3)
    env = StreamingKVEnv(model_path=str(folder), dataset=str(tmp_path / "notes.txt"), episode_tokens=64,
                         chunk_tokens=32, tpot_model=TPOT, budget="1.06ms")
    assert env.stream_prefix == [bos] == stream_prefix(PreTrainedTokenizerFast.from_pretrained(folder))
    plain = StreamingKVEnv(dataset=str(tmp_path / "notes.txt"), episode_tokens=64, chunk_tokens=32,
                           tpot_model=TPOT, budget="1.06ms")
    assert plain.stream_prefix == []  # the shipped tokenizer adds nothing: episodes as before
    document = env.documents[0]
    assert document[0] != bos  # the prefix is taken off the document and put before every window
    starts = [start for split in ("train", "validation", "test") for _, start in env.windows[split]]
    assert sorted(starts)[:3] == [0, 64, 128]  # 64 document tokens after the BOS: 65 ids, 64 predictions
    for split in ("train", "test"):
        for sample_id in range(env.num_samples(split)):
            ids = env._new_streamer(split, sample_id).token_ids.tolist()
            start = env.windows[split][sample_id][1]
            assert ids[0] == bos and ids[1:] == document[start:start + 64] and len(ids) == 65
    env.reset(seed=0, options={"split": "test", "sample_id": 0})
    done, predicted = False, 0
    while not done:
        _, reward, done, _, info = env.step(np.zeros(len(env.knob_names), dtype=np.int64))
        predicted += 32
    assert predicted == 64 and np.isfinite(info["episode_reward"]) and env._streamer.cursor == 64
