"""The generic HF backend on tiny real models: two-stage runs equal Hugging Face ``generate``
under the same knobs, stage-1 states are reusable, generation settings are honoured."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS_ID, WORDS, random_image
from transformers import CLIPImageProcessorPil, Idefics2ImageProcessorPil

from backends.base import Sample
from backends.hf import HFBackend
from backends.knobs import KnobConfig, KnobError, apply_knobs
from backends.loading import GenerationSettings, LoadedModel, ModelSpec

VISION_FAMILIES = ("llava_olmoe", "llava_llama", "idefics2")
MOE_FAMILIES = ("olmoe", "qwen2_moe", "mixtral", "llava_olmoe")
ALL_FAMILIES = ("olmoe", "qwen2_moe", "mixtral", "gpt_neox", "llava_olmoe", "llava_llama", "idefics2")
GREEDY = GenerationSettings(max_new_tokens=4)


class WordTask:
    """Four questions per split over the tiny vocabulary, each with a random image; exact-match score."""

    question_types = ("what",)

    def samples(self, split):
        return [Sample(sample_id=i, split=split, question=" ".join(WORDS[3 * i + j] for j in range(3 + i)),
                       reference=WORDS[i], image=random_image(seed=100 + i), question_type=0) for i in range(4)]

    def score(self, answer, sample):
        return float(answer == sample.reference)


def image_processor(name):
    if name == "idefics2":
        return Idefics2ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32, "shortest_edge": 32})
    if name in VISION_FAMILIES:
        return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return None


@pytest.fixture
def make_backend(tiny, word_tokenizer):
    def build(name: str, generation: GenerationSettings = GREEDY) -> HFBackend:
        loaded = LoadedModel(tiny(name), word_tokenizer, image_processor(name), ModelSpec(model=f"tiny/{name}"),
                             revision_loaded="test")
        template = "<image> {question}" if name in VISION_FAMILIES else "{question}"
        return HFBackend(loaded, WordTask(), generation, prompt_template=template, name="test")

    return build


def knob_cases(name: str) -> list[KnobConfig]:
    """Native, cheaper, and K < N vision-token configurations of one family."""
    moe, vision = name in MOE_FAMILIES, name in VISION_FAMILIES
    cases = [KnobConfig(), KnobConfig(top_k=2 if moe else None, depth=3),
             KnobConfig(top_k=1 if moe else None, depth=1)]
    if vision:
        cases += [KnobConfig(tier="low"), KnobConfig(tier="medium", token_budget=0.5, top_k=2 if moe else None, depth=3),
                  KnobConfig(tier="high", token_budget=0.25, top_k=1 if moe else None, depth=2)]
    return cases


@torch.no_grad()
def hf_generate(backend: HFBackend, sample: Sample, knobs: KnobConfig) -> list[int]:
    """Hugging Face ``generate`` under ``apply_knobs``, built independently of the backend's stages:
    the prompt's image placeholder repeated K times and the processor's pixels."""
    gen = backend.generation
    ids = backend.tokenizer(backend.prompt_template.format(question=sample.question))["input_ids"]
    inputs = {}
    if backend.knob_space.has_vision:
        k = backend.knob_space.vision_tokens(knobs)
        image_id = backend.parts.image_token_id
        ids = [t for i in ids for t in ([image_id] * k if i == image_id else [i])]
        inputs = {key: value.to(backend.device)
                  for key, value in backend.image_processor(images=[sample.image], return_tensors="pt").items()}
    ids = torch.tensor([ids], device=backend.device)
    with apply_knobs(backend.model, knobs, backend.knob_space):
        out = backend.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs,
                                     max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens,
                                     do_sample=False, eos_token_id=EOS_ID, pad_token_id=0)
    new = out[0, ids.shape[1]:].tolist()
    return new[:new.index(EOS_ID)] if EOS_ID in new else new


def same_outcome(a, b) -> bool:
    return (a.answer, a.score, a.token_counts, a.knobs, a.empty_output, a.nonfinite_logits) == (
        b.answer, b.score, b.token_counts, b.knobs, b.empty_output, b.nonfinite_logits)


def cache_tensors(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if isinstance(t, torch.Tensor)]


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_two_stage_run_equals_hf_generate_under_the_same_knobs(make_backend, name):
    backend = make_backend(name)
    sample = backend.samples("test")[1]
    for knobs in knob_cases(name):
        outcome = backend.run(sample, knobs)
        reference = hf_generate(backend, sample, knobs)
        assert outcome.new_tokens == len(reference) >= 1, str(knobs)
        assert outcome.answer == backend.tokenizer.decode(reference, skip_special_tokens=True).strip(), str(knobs)
        assert not outcome.nonfinite_logits


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_run_is_stage2_of_stage1(make_backend, name):
    backend = make_backend(name)
    sample = backend.samples("validation")[2]
    for knobs in knob_cases(name)[1:]:
        state = backend.run_stage1(sample, knobs.tier, knobs.token_budget)
        assert same_outcome(backend.run(sample, knobs), backend.run_stage2(state, knobs)), str(knobs)


@pytest.mark.parametrize("name", ["llava_olmoe", "idefics2", "mixtral", "gpt_neox"])
def test_stage2_leaves_the_stage1_state_untouched(make_backend, name):
    backend = make_backend(name)
    sample = backend.samples("train")[0]
    tier = "medium" if name in VISION_FAMILIES else None
    budget = 0.5 if name in VISION_FAMILIES else 1.0
    cheap = KnobConfig(tier=tier, token_budget=budget, top_k=1 if name in MOE_FAMILIES else None, depth=2)
    full = KnobConfig(tier=tier, token_budget=budget)
    state = backend.run_stage1(sample, tier, budget)
    payload = state.payload[2]
    hidden_before = payload.hidden.clone()
    cache_before = [t.clone() for t in cache_tensors(payload.cache)]
    summary_before = state.summary.copy()

    first_cheap = backend.run_stage2(state, cheap)
    from_state_full = backend.run_stage2(state, full)
    second_cheap = backend.run_stage2(state, cheap)

    assert same_outcome(first_cheap, second_cheap)
    assert same_outcome(first_cheap, backend.run(sample, cheap))
    assert same_outcome(from_state_full, backend.run(sample, full))
    assert torch.equal(payload.hidden, hidden_before)
    after = cache_tensors(payload.cache)
    assert len(after) == len(cache_before) and all(torch.equal(a, b) for a, b in zip(after, cache_before))
    assert (state.summary == summary_before).all()


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_every_knob_value_generates_new_tokens(make_backend, name):
    """Nothing forces a token here (min_new_tokens=0): an empty answer would show."""
    backend = make_backend(name, GenerationSettings(max_new_tokens=2, min_new_tokens=0))
    space = backend.knob_space
    values = [KnobConfig(depth=d) for d in range(1, space.num_layers + 1)]
    if space.has_moe:
        values += [KnobConfig(top_k=k) for k in range(1, space.num_experts + 1)]
    if space.has_vision:
        values += [KnobConfig(tier=t, token_budget=b) for t in space.tier_names for b in (0.1, 0.25, 0.5, 0.75, 1.0)]
    sample = backend.samples("test")[0]
    for knobs in values:
        outcome = backend.run(sample, knobs)
        assert outcome.new_tokens >= 1, f"no new token under {knobs}"
        assert outcome.token_counts.vision_tokens == space.vision_tokens(knobs)


def test_token_counts_and_summary(make_backend, word_tokenizer):
    backend = make_backend("llava_olmoe")
    sample = backend.samples("test")[3]
    knobs = KnobConfig(tier="high", token_budget=0.25)
    state = backend.run_stage1(sample, knobs.tier, knobs.token_budget)
    n_text = len(word_tokenizer(backend.prompt_template.format(question=sample.question))["input_ids"]) - 1
    assert state.token_counts.prompt_tokens == n_text
    assert (state.token_counts.vision_tokens_full, state.token_counts.vision_tokens) == (16, 4)
    assert state.summary.shape == (backend.summary_dim,) and state.summary.dtype.name == "float32"
    assert torch.isfinite(torch.from_numpy(state.summary)).all()
    outcome = backend.run_stage2(state, knobs)
    assert outcome.token_counts.prefill_tokens == n_text + 4
    assert 1 <= outcome.new_tokens <= GREEDY.max_new_tokens


def test_stage2_rejects_knobs_that_do_not_match_the_state(make_backend):
    backend = make_backend("llava_olmoe")
    state = backend.run_stage1(backend.samples("test")[0], "low")
    with pytest.raises(KnobError, match="tier='low'"):
        backend.run_stage2(state, KnobConfig(tier="high"))
    with pytest.raises(KnobError, match=r"top_k=9.*\[1, 8\]"):
        backend.run_stage2(state, KnobConfig(tier="low", top_k=9))
    with pytest.raises(KnobError, match="unknown vision tier 'ultra'"):
        backend.run_stage1(backend.samples("test")[0], "ultra")


def test_bad_split_and_sample_id(make_backend):
    backend = make_backend("olmoe")
    with pytest.raises(ValueError, match="split='dev' is unknown"):
        backend.samples("dev")
    with pytest.raises(ValueError, match=r"sample_id=4 .*0\.\.3"):
        backend.sample("test", 4)


# ---------------------------------------------------------------------------------------------
# Generation settings are honoured
# ---------------------------------------------------------------------------------------------
def test_sampling_is_reproducible_with_a_seed_and_not_greedy(make_backend):
    sampled = GenerationSettings(max_new_tokens=4, do_sample=True, temperature=3.0, seed=7)
    name, knobs = "llava_olmoe", KnobConfig(tier="medium", top_k=2)
    greedy, first, second = make_backend(name), make_backend(name, sampled), make_backend(name, sampled)
    other_seed = make_backend(name, GenerationSettings(max_new_tokens=4, do_sample=True, temperature=3.0, seed=8))
    samples = greedy.samples("test")
    first_answers = [first.run(s, knobs).answer for s in samples]
    assert first_answers == [second.run(s, knobs).answer for s in samples]
    assert first_answers != [greedy.run(s, knobs).answer for s in samples]
    assert first_answers != [other_seed.run(s, knobs).answer for s in samples]


def test_top_p_is_honoured(make_backend):
    """A nucleus smaller than the top token's mass leaves only that token: sampling becomes greedy."""
    nucleus = make_backend("olmoe", GenerationSettings(max_new_tokens=4, do_sample=True, temperature=3.0, top_p=1e-6))
    greedy = make_backend("olmoe")
    for sample in greedy.samples("test"):
        assert nucleus.run(sample, KnobConfig()).answer == greedy.run(sample, KnobConfig()).answer


@pytest.fixture
def eos_loving(tiny):
    """Make the tiny OLMoE put nearly all its mass on EOS (a hook on the LM head), then undo it."""
    model = tiny("olmoe")

    def push_eos(module, args, logits):
        logits = logits.clone()
        logits[..., EOS_ID] += 1e4
        return logits

    handle = model.lm_head.register_forward_hook(push_eos)
    yield model
    handle.remove()


def test_min_new_tokens_forces_tokens_past_eos(make_backend, eos_loving):
    sample = make_backend("olmoe").samples("test")[0]
    free = make_backend("olmoe", GenerationSettings(max_new_tokens=4, min_new_tokens=0)).run(sample, KnobConfig())
    assert free.new_tokens == 0 and free.empty_output
    forced_backend = make_backend("olmoe", GenerationSettings(max_new_tokens=4, min_new_tokens=3))
    for knobs in (KnobConfig(), KnobConfig(top_k=1, depth=2)):
        forced = forced_backend.run(sample, knobs)
        assert forced.new_tokens == 3  # EOS is blocked for three steps, then wins
        assert len(hf_generate(forced_backend, sample, knobs)) == 3


def test_max_new_tokens_is_honoured(make_backend):
    for limit in (1, 3):
        backend = make_backend("gpt_neox", GenerationSettings(max_new_tokens=limit))
        assert all(backend.run(s, KnobConfig()).new_tokens <= limit for s in backend.samples("test"))
        assert len(hf_generate(backend, backend.samples("test")[0], KnobConfig())) == \
            backend.run(backend.samples("test")[0], KnobConfig()).new_tokens


def test_eos_id_zero_is_honoured(make_backend, tiny):
    """Pythia-style models end with token 0; a falsy id must not fall back to the tokenizer's EOS."""
    model = tiny("gpt_neox")
    saved_eos = model.generation_config.eos_token_id

    def push_token_zero(module, args, logits):
        logits = logits.clone()
        logits[..., 0] += 1e4
        return logits

    handle = model.get_output_embeddings().register_forward_hook(push_token_zero)
    model.generation_config.eos_token_id = 0
    try:
        backend = make_backend("gpt_neox", GenerationSettings(max_new_tokens=4, min_new_tokens=0))
        assert backend.run(backend.samples("test")[0], KnobConfig()).new_tokens == 0
    finally:
        model.generation_config.eos_token_id = saved_eos
        handle.remove()


def test_backend_runs_leave_the_model_as_they_found_it(make_backend, tiny):
    model = tiny("llava_olmoe")
    ids = torch.tensor([[2, 10, 11, 12]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    backend = make_backend("llava_olmoe")
    state = backend.run_stage1(backend.samples("test")[0], "low", 0.5)
    backend.run_stage2(state, KnobConfig(tier="low", token_budget=0.5, top_k=1, depth=1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
