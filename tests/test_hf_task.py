"""``backend=hf`` end to end: tiny random checkpoints of every supported family saved with
``save_pretrained`` beside a tokenizer / image processor, loaded by path with a user's dataset
(JSON lines and ``save_to_disk``), one episode of every env each supports; prompts through a chat
template or a template string; bad data and bad placement as one clear error."""

from __future__ import annotations

import json
import logging
import shutil
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import WORDS, build_word_tokenizer, random_image
from fake_latency import AnalyticEstimator
from model_factories import make
from transformers import CLIPImageProcessorPil, Idefics2ImageProcessorPil, Qwen2VLImageProcessorPil

import envs  # noqa: F401  (registers the env ids)
from backends.knobs import KnobConfig
from backends.loading import ModelNotAvailableError, SpecError
from backends.registry import load_backend
from backends.scoring import normalize_answer, score_answer, vqa_soft_accuracy
from backends.vqa_data import DataError

VISION = ("llava_olmoe", "llava_llama", "idefics2")
FAMILIES = ("llava_olmoe", "llava_llama", "idefics2", "olmoe", "gpt_neox")
# A chat template over the word vocabulary: the user turn (image first), then "w90" as the
# assistant prompt; strings in, so the rendered prompt is checkable.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                 "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}"
                 "{% endif %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} w90{% endif %}")
N_ROWS = 20  # a seeded 16 / 2 / 2 split


def _question(i: int) -> str:
    return " ".join(WORDS[(3 * i + j) % 80] for j in range(3 + i % 3))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{family: directory}``: each tiny random model saved with its tokenizer (with a chat
    template) and, for vision families, its image processor."""
    root = tmp_path_factory.mktemp("hf_checkpoints")
    return {name: save_checkpoint(name, root / name) for name in FAMILIES}


def save_checkpoint(name: str, path):
    """The tiny random model ``name`` saved with the word tokenizer (with a chat template) and, for
    a vision family, its image processor; returns ``path``."""
    make(name).save_pretrained(path)
    tokenizer = build_word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    if name == "idefics2":
        Idefics2ImageProcessorPil(do_image_splitting=False,
                                  size={"longest_edge": 32, "shortest_edge": 32}).save_pretrained(path)
    elif name.startswith("qwen") and name.endswith(("_vl", "_vl_moe")):  # 8 px patches, 2 x 2 merged
        Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2).save_pretrained(path)
    elif name in VISION:
        CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _rows(with_image: bool) -> list[dict]:
    rows = []
    for i in range(N_ROWS):
        row = {"question": _question(i), "id": f"q{i}"}
        if i % 2:
            row["answers"] = [WORDS[i % 5]] * 3 + [WORDS[(i + 1) % 5]] * 7
        else:
            row["answer"] = WORDS[i % 5]
            row["answers"] = None
        if with_image:
            row["image"] = f"images/{i:02d}.png"
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def jsonl_data(tmp_path_factory):
    """A JSON-lines VQA file with PNG images beside it (some rows one answer, some ten)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("vqa_jsonl")
    (root / "images").mkdir()
    for i in range(N_ROWS):
        Image.fromarray(random_image(seed=i, size=32)).save(root / "images" / f"{i:02d}.png")
    path = root / "data.jsonl"
    path.write_text("\n".join(json.dumps({k: v for k, v in r.items() if v is not None}) for r in _rows(True)) + "\n")
    text = root / "text.jsonl"
    text.write_text("\n".join(json.dumps({k: v for k, v in r.items() if v is not None}) for r in _rows(False)) + "\n")
    return {"vision": path, "text": text}


@pytest.fixture(scope="module")
def disk_data(tmp_path_factory):
    """The same data as a ``DatasetDict.save_to_disk`` directory with an ``Image`` column and its
    own train / validation / test splits and column names."""
    import datasets

    root = tmp_path_factory.mktemp("vqa_disk")
    out = {}
    for kind in ("vision", "text"):
        rows = [{"query": r["question"], "label": r["answers"] or [r["answer"]],
                 **({"picture": random_image(seed=i, size=32)} if kind == "vision" else {})}
                for i, r in enumerate(_rows(False))]
        features = {"query": datasets.Value("string"), "label": datasets.Sequence(datasets.Value("string"))}
        if kind == "vision":
            features["picture"] = datasets.Image()
        feats = datasets.Features(features)
        dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:12], features=feats),
                                   "val": datasets.Dataset.from_list(rows[12:16], features=feats),
                                   "test": datasets.Dataset.from_list(rows[16:], features=feats)})
        dd.save_to_disk(root / kind)
        out[kind] = root / kind
    return out


def hf(checkpoint, dataset, **options):
    return load_backend("hf", model=str(checkpoint), dataset=dataset if isinstance(dataset, dict) else str(dataset),
                        generation={"max_new_tokens": 2}, **options)


def one_episode(env_id: str, backend, seed: int = 0) -> dict:
    env = gym.make(env_id, backend=backend, budget="[20ms,80ms]", estimator=AnalyticEstimator())
    obs, info = env.reset(seed=seed)
    assert env.observation_space.contains(obs)
    terminated = False
    while not terminated:
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs) and np.isfinite(reward)
    return info


# ---------------------------------------------------------------------------------------------
# Every family through backend=hf, both dataset forms, every env it supports
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("form", ["jsonl", "save_to_disk"])
def test_every_family_runs_every_env_it_supports(checkpoints, jsonl_data, disk_data, name, form):
    kind = "vision" if name in VISION else "text"
    if form == "jsonl":
        backend = hf(checkpoints[name], jsonl_data[kind])
        sizes = (16, 2, 2)
    else:
        backend = hf(checkpoints[name], disk_data[kind], columns={"question": "query", "answers": "label",
                                                                  "image": "picture"}, splits={"validation": "val"})
        sizes = (12, 4, 4)
    assert [len(backend.samples(s)) for s in ("train", "validation", "test")] == list(sizes)
    space = backend.knob_space
    assert space.has_vision == (name in VISION)
    assert backend.question_types == () and backend.samples("train")[0].question_type == -1
    assert backend.recorded_estimator_file() is None
    feature = backend.question_features(backend.samples("train")[0])
    assert feature.shape == (backend.question_feature_dim,) and feature.dtype == np.float32
    assert backend.identity()["content_revision"].startswith("local-")

    env = gym.make("MultiKnob-v0", backend=backend, budget="[20ms,80ms]", estimator=AnalyticEstimator())
    expected_heads = [max(1, len(space.tier_names))] + ([len(space.top_ks)] if space.has_moe else []) \
        + [len(space.depths)]
    assert list(env.action_space.nvec) == expected_heads
    info = one_episode("MultiKnob-v0", backend)
    assert 0.0 <= info["score"] <= 1.0 and info["vision_tokens"] == space.vision_tokens(
        KnobConfig(tier=info["knobs"]["tier"]))
    if name in VISION:
        assert one_episode("TokenBudget-v0", backend)["knobs"]["token_budget"] in (0.25, 0.5, 0.75, 1.0)
    else:
        with pytest.raises(ValueError, match="TokenBudget-v0 needs a backend with a vision tower.*MultiKnob-v0"):
            gym.make("TokenBudget-v0", backend=backend, budget="[20ms,80ms]", estimator=AnalyticEstimator())


def test_gpt_neox_through_backend_hf_streams_a_kv_episode(checkpoints, jsonl_data):
    backend = hf(checkpoints["gpt_neox"], jsonl_data["text"])
    docs = [list(np.random.default_rng(0).integers(4, 90, 64))]
    env = gym.make("StreamingKV-v0", model=backend.model, documents=docs, budget="4ms", chunk_tokens=8,
                   episode_tokens=32)
    env.reset(seed=0)
    terminated = truncated = False
    while not (terminated or truncated):
        _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert np.isfinite(reward)


def test_knob_ranges_and_tier_mode_from_options(checkpoints, jsonl_data):
    backend = hf(checkpoints["llava_olmoe"], jsonl_data["vision"], tier_mode="pool",
                 knobs={"tiers": {"low": 4, "high": 16}, "top_ks": [2, 4], "depths": [3, 4]})
    space = backend.knob_space
    assert (space.tier_mode, space.tiers, space.top_ks, space.depths) == ("pool", {"low": 4, "high": 16}, (2, 4), (3, 4))
    resized = hf(checkpoints["llava_llama"], jsonl_data["vision"], knobs={"tier_sizes": {"low": 16, "high": 32}})
    assert (resized.knob_space.tier_mode, resized.knob_space.tiers) == ("resize", {"low": 4, "high": 16})
    state = resized.run_stage1(resized.samples("test")[0], "low")
    assert (state.token_counts.vision_tokens_full, state.token_counts.vision_tokens) == (4, 4)
    assert resized.expected_token_counts(resized.samples("test")[0], KnobConfig(tier="low")).vision_tokens_full == 4


# ---------------------------------------------------------------------------------------------
# Prompts: the model's chat template, or a template string
# ---------------------------------------------------------------------------------------------
def test_chat_template_path(checkpoints, jsonl_data):
    backend = hf(checkpoints["llava_llama"], jsonl_data["vision"])
    sample = backend.samples("train")[0]
    assert backend.prompt_format.chat_template == CHAT_TEMPLATE
    assert backend.prompt_text(sample) == f"<image> {sample.question} w90"
    # The chat template's text carries its own special tokens: no BOS added, image tokens excluded.
    assert backend.prompt_tokens(sample) == len(sample.question.split()) + 1
    assert backend.run(sample, KnobConfig(tier="low")).new_tokens >= 1
    text = hf(checkpoints["olmoe"], jsonl_data["text"])
    assert text.prompt_text(text.samples("test")[0]) == f"{text.samples('test')[0].question} w90"


def test_template_string_path(checkpoints, jsonl_data):
    backend = hf(checkpoints["llava_llama"], jsonl_data["vision"], prompt_template="w91 <image> {question} w92")
    sample = backend.samples("train")[0]
    assert backend.prompt_format.chat_template is None
    assert backend.prompt_text(sample) == f"w91 <image> {sample.question} w92"
    assert backend.prompt_tokens(sample) == len(sample.question.split()) + 3  # BOS, w91, w92
    assert backend.run(sample, KnobConfig(tier="medium")).new_tokens >= 1
    off = hf(checkpoints["olmoe"], jsonl_data["text"], chat_template=False)
    assert off.prompt_text(off.samples("test")[0]) == off.samples("test")[0].question
    with pytest.raises(ValueError, match="no image token"):
        bad = hf(checkpoints["llava_llama"], jsonl_data["vision"], prompt_template="{question} w92")
        bad.run_stage1(bad.samples("test")[0], "low")


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def test_vqa_soft_accuracy_on_a_known_case():
    # VQAv2: ten human answers; an answer matched by 3+ annotators is fully right, by 2 two thirds.
    references = ["two", "2", "2", "3", "three", "3", "3", "a couple", "4", "2 "]
    assert vqa_soft_accuracy("2", references) == 1.0  # "two", "2", "2", "2 " -> 4 matches
    assert vqa_soft_accuracy("Four.", references) == pytest.approx(1 / 3)
    assert vqa_soft_accuracy("1", references) == 0.0
    assert vqa_soft_accuracy("couple", references) == pytest.approx(1 / 3)  # article dropped
    assert score_answer("3", ["3", "3", "4", "5"]) == pytest.approx(2 / 3)
    assert score_answer("The Red.", "red") == 1.0 and score_answer("red", ["blue"]) == 0.0
    assert normalize_answer("Whats 1.5 two?") == "what's 1.5 2"


def test_scores_use_every_reference(checkpoints, jsonl_data):
    backend = hf(checkpoints["olmoe"], jsonl_data["text"])
    many = next(s for s in backend.samples("train") if len(s.meta["answers"]) == 10)
    right, other = many.meta["answers"][0], many.meta["answers"][-1]
    assert backend.task.score(right, many) == 1.0 and backend.task.score(other, many) == 1.0
    assert many.reference == other  # the most common answer (7 of 10)
    one = next(s for s in backend.samples("train") if len(s.meta["answers"]) == 1)
    assert backend.task.score(one.reference, one) == 1.0


# ---------------------------------------------------------------------------------------------
# Bad data and bad options: one clear error each; unreadable images skipped and counted
# ---------------------------------------------------------------------------------------------
def test_missing_file_and_column_name_them(checkpoints, jsonl_data, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        hf(checkpoints["olmoe"], tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"no column 'prompt' \(question\).*columns present: question, id"):
        hf(checkpoints["olmoe"], jsonl_data["text"], columns={"question": "prompt"})
    with pytest.raises(DataError, match=r"no column 'image'"):
        hf(checkpoints["llava_llama"], jsonl_data["text"])
    with pytest.raises(DataError, match="unknown dataset column key"):
        hf(checkpoints["olmoe"], jsonl_data["text"], columns={"query": "q"})
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "w4", "answer": "w5"}\n{not json\n')
    with pytest.raises(DataError, match="could not be read as JSON lines"):
        hf(checkpoints["olmoe"], broken)


def test_unreadable_images_are_skipped_and_counted(checkpoints, jsonl_data, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(jsonl_data["vision"].parent, root)
    (root / "images" / "03.png").write_bytes(b"not a png")
    (root / "images" / "05.png").unlink()
    with caplog.at_level(logging.WARNING, logger="backends.vqa_data"):
        backend = hf(checkpoints["llava_llama"], root / "data.jsonl")
        total = sum(len(backend.samples(s)) for s in ("train", "validation", "test"))
    assert total == N_ROWS - 2 and sum(backend.task.skipped.values()) == 2
    assert "unreadable image" in caplog.text and "skipped" in caplog.text


def test_empty_split_is_a_clear_error(checkpoints, tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text('{"question": "w4", "answer": "w5"}\n{"question": "w6", "answer": "w7"}\n')
    backend = hf(checkpoints["olmoe"], path)
    with pytest.raises(DataError, match="split 'validation' .* is empty"):
        backend.samples("validation")


def test_missing_model_says_how_to_make_it_available(jsonl_data, tmp_path):
    with pytest.raises(ModelNotAvailableError, match="hf download some-org/missing-model"):
        load_backend("hf", model="some-org/missing-model", dataset=str(jsonl_data["text"]))
    with pytest.raises(ValueError, match="does not exist"):
        load_backend("hf", model=str(tmp_path / "no-model"), dataset=str(jsonl_data["text"]))
    with pytest.raises(SpecError, match="needs model="):
        load_backend("hf", dataset=str(jsonl_data["text"]))
    with pytest.raises(DataError, match="needs dataset="):
        load_backend("hf", model=str(tmp_path))
    with pytest.raises(SpecError, match=r"unknown backend=hf option\(s\) \['foo'\]; accepted: model, dataset"):
        load_backend("hf", model=str(tmp_path), dataset=str(jsonl_data["text"]), foo=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_error(checkpoints, jsonl_data):
    with pytest.raises(SpecError, match=r"device='cuda' needs CUDA.*is_available\(\) is False.*device=cpu"):
        hf(checkpoints["olmoe"], jsonl_data["text"], device="cuda")
    with pytest.raises(SpecError, match=r"device='cuda:1' needs CUDA"):
        load_backend("tiny", device="cuda:1")


@pytest.mark.parametrize("options, fragment", [
    ({"quantization": "fp4", "device": "cuda", "device_map": {"model": 0, "lm_head": "cpu"}},
     "mixes the CPU with an accelerator"),
    ({"quantization": "q3"}, "quantization='q3' is invalid; accepted: nf4, fp4, int8"),
])
def test_quantization_placement_is_one_rule(checkpoints, jsonl_data, options, fragment):
    with pytest.raises(SpecError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        hf(checkpoints["olmoe"], jsonl_data["text"], **options)


def test_quantization_on_a_device_bitsandbytes_does_not_run_names_it(checkpoints, jsonl_data, monkeypatch):
    """The rule follows what the installed bitsandbytes declares, not a fixed "CUDA only"."""
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"})
    with pytest.raises(SpecError, match=r"quantization='nf4' cannot run on cpu \(device='cpu'\): bitsandbytes "
                                        r"\S+ runs it on cuda; accepted"):
        hf(checkpoints["olmoe"], jsonl_data["text"], quantization="nf4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(SpecError, match="needs bitsandbytes .* not importable"):
        hf(checkpoints["olmoe"], jsonl_data["text"], quantization="int8")


def test_remote_code_is_off_by_default(checkpoints, jsonl_data, monkeypatch):
    import transformers

    seen = {}
    original = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen["trust_remote_code"] = kwargs.get("trust_remote_code")
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    backend = hf(checkpoints["gpt_neox"], jsonl_data["text"], split_seed=3)
    assert seen["trust_remote_code"] is False and backend.loaded.spec.trust_remote_code is False


def test_content_revision_is_the_same_for_a_copy_and_differs_for_other_weights(checkpoints, jsonl_data, tmp_path):
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(checkpoints["olmoe"], copy)
    first = hf(checkpoints["olmoe"], jsonl_data["text"]).identity()["content_revision"]
    assert hf(copy, jsonl_data["text"]).identity()["content_revision"] == first
    other = hf(checkpoints["gpt_neox"], jsonl_data["text"]).identity()["content_revision"]
    assert other != first and str(checkpoints["olmoe"]) not in first


# ---------------------------------------------------------------------------------------------
# The shipped tiny model as a plain checkpoint on an exported dataset
# ---------------------------------------------------------------------------------------------
def test_tiny_checkpoint_through_backend_hf_on_its_exported_dataset(tmp_path):
    from backends.tiny import CHECKPOINT_DIR
    from backends.tiny.export_dataset import export_dataset

    path = export_dataset(tmp_path / "tiny_vqa", n=40)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 40 and all((path.parent / r["image"]).is_file() for r in lines)
    backend = load_backend("hf", model=str(CHECKPOINT_DIR), dataset=str(path))
    tiny = load_backend("tiny")
    assert backend.knob_space == tiny.knob_space and backend.knob_space.tier_mode == "pool"
    assert backend.identity()["content_revision"] == tiny.identity()["content_revision"]
    assert [len(backend.samples(s)) for s in ("train", "validation", "test")] == [32, 4, 4]
    assert set(backend.question_types) <= set(tiny.question_types)
    # The same input gets the same answer through either backend.
    sample = backend.samples("test")[0]
    index = int(sample.meta["id"].split("-")[1])
    assert backend.run(sample, KnobConfig(tier="medium")).answer == \
        tiny.run(tiny.samples("test")[index], KnobConfig(tier="medium")).answer
    info = one_episode("MultiKnob-v0", backend)
    assert info["knobs"]["top_k"] in backend.knob_space.top_ks


# ---------------------------------------------------------------------------------------------
# Presets: every key is a load_hf_backend option; they stop at the machine or the missing model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, hub_id", [("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf"),
                                            ("idefics2-8b", "HuggingFaceM4/idefics2-8b"),
                                            ("olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924-Instruct"),
                                            ("pythia-2.8b", "EleutherAI/pythia-2.8b"),
                                            ("qwen3-vl-2b", "Qwen/Qwen3-VL-2B-Instruct"),
                                            ("qwen3-vl-30b-a3b", "Qwen/Qwen3-VL-30B-A3B-Instruct")])
def test_presets_compose_and_name_their_model(jsonl_data, preset, hub_id):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = OmegaConf.to_container(compose("config", overrides=[f"backend={preset}"]).backend, resolve=True)
    assert cfg.pop("name") == "hf" and cfg["model"] == cfg["hub_id"] == hub_id and cfg["revision"]
    cfg["dataset"] = str(jsonl_data["vision"])
    expected = "needs CUDA" if not torch.cuda.is_available() else "not in the local Hugging Face cache"
    with pytest.raises(SpecError, match=expected):
        load_backend("hf", **cfg)


def test_hub_id_in_the_local_cache_loads_offline_with_its_commit_as_revision(checkpoints, jsonl_data, tmp_path,
                                                                             monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--olmoe"
    shutil.copytree(checkpoints["olmoe"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    backend = load_backend("hf", model="tiny-org/olmoe", dataset=str(jsonl_data["text"]))
    assert backend.identity()["content_revision"] == commit
    with pytest.raises(ModelNotAvailableError, match="revision 'v2'.*hf download tiny-org/olmoe --revision v2"):
        load_backend("hf", model="tiny-org/olmoe", revision="v2", dataset=str(jsonl_data["text"]))


# ---------------------------------------------------------------------------------------------
# Observations condition on the question; the group layout follows each model's action space
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, env_id", [("olmoe", "MultiKnob-v0"), ("llava_llama", "MultiKnob-v0"),
                                          ("llava_llama", "TokenBudget-v0")])
def test_observations_carry_the_question_features(checkpoints, jsonl_data, name, env_id):
    """Without question types, two inputs with different questions get different stage-0
    observations: the backend's question features sit after the image size."""
    backend = hf(checkpoints[name], jsonl_data["text" if name == "olmoe" else "vision"])
    env = gym.make(env_id, backend=backend, budget="40ms", estimator=AnalyticEstimator())
    base = env.unwrapped
    assert base.input_feature_dim == 4 + backend.question_feature_dim  # no question types
    offset = 5 if env_id == "MultiKnob-v0" else 4  # MultiKnob's stage flag comes first
    observations = []
    for sample in backend.samples("train")[:2]:
        obs, _ = env.reset(options={"sample_id": sample.sample_id})
        assert obs.shape == env.observation_space.shape and obs.dtype == np.float32
        assert env.observation_space.contains(obs)
        np.testing.assert_allclose(obs[offset:offset + backend.question_feature_dim],
                                   backend.question_features(sample), rtol=1e-6)
        np.testing.assert_array_equal(obs, base.stage_observation(sample.sample_id, 40.0, "train", 0))
        observations.append(obs)
    assert backend.samples("train")[0].question != backend.samples("train")[1].question
    assert not np.array_equal(observations[0], observations[1])


@pytest.mark.parametrize("name, nvec", [("olmoe", lambda s: (1, len(s.top_ks), len(s.depths))),
                                        ("llava_llama", lambda s: (len(s.tier_names), len(s.depths))),
                                        ("llava_olmoe", lambda s: (len(s.tier_names), len(s.top_ks), len(s.depths)))])
def test_group_layout_follows_the_action_space(checkpoints, jsonl_data, name, nvec):
    """A text-only MoE has one (None) tier choice, a dense VLM tier + depth: the GroupEnv layout,
    stage observations and group evaluation follow, and a group scores as stepping does."""
    from agents.base import EnvLayout

    backend = hf(checkpoints[name], jsonl_data["text" if name == "olmoe" else "vision"])
    env = gym.make("MultiKnob-v0", backend=backend, budget="40ms", estimator=AnalyticEstimator())
    layout = EnvLayout(env)
    assert tuple(layout.nvec) == nvec(backend.knob_space) == tuple(env.action_space.nvec)
    assert layout.stage_heads == [[0], list(range(1, len(layout.nvec)))]
    actions = layout.all_actions()
    stage1 = layout.observation(0, 40.0, "train", 1, actions[-1])
    assert stage1.shape == env.observation_space.shape and stage1[0] == 1.0
    rewards, infos = layout.evaluate(0, 40.0, actions, "train")
    assert rewards.shape == (len(actions),) and np.isfinite(rewards).all()
    obs, _ = env.reset(options={"sample_id": 0, "budget": 40.0, "split": "train"})
    for stage in range(layout.n_stages):
        obs, reward, terminated, _, info = env.step(layout.to_env_action(actions[-1], stage))
    assert terminated and reward == pytest.approx(rewards[-1]) and info["knobs"] == infos[-1]["knobs"]
