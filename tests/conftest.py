"""Shared fixtures: tiny models built in code, a word-level tokenizer, and compute probes.

A :class:`ComputeProbe` puts forward hooks on a model and records what it actually computes
(decoder blocks executed, experts per token in every MoE block, the sequence entering block 1,
what the final norm receives), so knob tests check the computation rather than reading back the
attribute a knob sets.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
from model_factories import IMAGE_TOKEN_ID, VOCAB, make
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from backends.knobs import model_parts
from bench._hooks import ComputeProbe as BenchComputeProbe

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
WORDS = [f"w{i}" for i in range(4, IMAGE_TOKEN_ID)]  # ordinary vocabulary words, ids 4..VOCAB-2

# The speed probe of latency profiles (latency_model.speed) moves with the load of a shared test
# machine: the suite does not let that decide whether a profile is cached or a warning is printed
# (tests/test_run_folder_safety.py drives the probe's bound and readings itself).
os.environ.setdefault("KNOBGYM_SPEED_PROBE_BOUND", "1000")

# The test models are tiny: intra-op parallelism buys nothing and, on busy shared cores, threads
# spinning for each other make one forward ~100x slower (measured: 2.7 s vs 3 ms for tiny OLMoE).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """``slow`` tests (full-size models) run only with ``-m slow`` or ``KNOBGYM_SLOW=1``."""
    if "slow" in (config.getoption("-m") or "") or os.environ.get("KNOBGYM_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or KNOBGYM_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class ComputeProbe(BenchComputeProbe):
    """:class:`bench._hooks.ComputeProbe` (blocks run, experts per token and (token, expert) pairs per
    MoE block, sequence length entering block 1, encoder patches) plus the tensors tests compare.

    Attributes (besides the base's):
        first_block_inputs: the hidden states entering decoder block 1, one per forward.
        last_block_output: output of the last decoder block that ran (latest forward).
        final_norm_inputs: what the final norm received, one per forward.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        parts = model_parts(model)
        for index, layer in enumerate(parts.layers):
            self._handles.append(layer.register_forward_hook(functools.partial(self._on_block_output, index)))
        self._handles.append(parts.final_norm.register_forward_hook(self._on_final_norm))

    def reset(self) -> None:
        super().reset()
        self.first_block_inputs: list[torch.Tensor] = []
        self.last_block_output: torch.Tensor | None = None
        self.final_norm_inputs: list[torch.Tensor] = []

    def _on_block(self, index, module, args, kwargs):
        super()._on_block(index, module, args, kwargs)
        if index == 0:
            self.first_block_inputs.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    def _on_block_output(self, index, module, args, output):
        self.last_block_output = (output[0] if isinstance(output, tuple) else output).detach().clone()

    def _on_final_norm(self, module, args, output):
        self.final_norm_inputs.append(args[0].detach().clone())


@pytest.fixture
def probe():
    """``probe(model) -> ComputeProbe``; every probe's hooks are removed when the test ends."""
    created: list[ComputeProbe] = []

    def attach(model):
        created.append(ComputeProbe(model))
        return created[-1]

    yield attach
    for p in created:
        p.remove()


_MODELS: dict[str, torch.nn.Module] = {}


@pytest.fixture(scope="session")
def tiny():
    """``tiny(name) -> model``: one tiny random-weight model per family, built once per session.

    Tests share them, which is itself a check: every knob context must leave the model as it found it.
    """

    def get(name: str) -> torch.nn.Module:
        if name not in _MODELS:
            _MODELS[name] = make(name)
        return _MODELS[name]

    return get


def build_word_tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer over the tiny models' vocabulary: ``<pad> </s> <s> <unk> w4 .. <image>``."""
    vocab = {"<pad>": PAD_ID, "</s>": EOS_ID, "<s>": BOS_ID, "<unk>": UNK_ID}
    vocab.update({word: 4 + i for i, word in enumerate(WORDS)})
    vocab["<image>"] = IMAGE_TOKEN_ID
    assert len(vocab) == VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="session")
def word_tokenizer() -> PreTrainedTokenizerFast:
    return build_word_tokenizer()


def random_image(seed: int, size: int = 32) -> np.ndarray:
    """An HxWx3 uint8 image of random pixels."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# The shipped tiny backend and a small latency estimator profiled on this machine (session-wide).
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_backend():
    from backends.registry import load_backend

    import os

    # KNOBGYM_TEST_TINY_CHECKPOINT runs the suite against another tiny checkpoint (e.g. one being
    # trained); by default the shipped one, the same cached object envs get from backend="tiny".
    checkpoint = os.environ.get("KNOBGYM_TEST_TINY_CHECKPOINT")
    return load_backend("tiny", checkpoint=checkpoint) if checkpoint else load_backend("tiny")


@pytest.fixture(scope="session")
def tiny_estimator(tiny_backend, tmp_path_factory):
    """A real estimator of the tiny backend on this device, from a short profile (tests need a
    deterministic estimator, not an accurate one; accuracy is the latency report's job)."""
    from latency_model import ProfileSettings, get_estimator

    settings = ProfileSettings(points=60, repeats=1, warmup=2, samples=12)
    return get_estimator(tiny_backend, cache_dir=tmp_path_factory.mktemp("latency-cache"), settings=settings,
                         progress=False)


@pytest.fixture(scope="session")
def random_tiny_checkpoint(tmp_path_factory):
    """A randomly initialised tiny VLM saved like the shipped one (fast agent / CLI tests)."""
    from backends.tiny.model import build_image_processor, build_model, build_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_random")
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    build_image_processor().save_pretrained(path)
    return path
