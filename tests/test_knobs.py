"""Knobs applied to real (tiny, random-weight) transformers models.

Every claim is checked on the computation, through forward hooks (:class:`conftest.ComputeProbe`):
the experts each token actually uses per MoE block, which decoder blocks run, what the final norm
receives, and which vision features enter the language model. Nothing here reads back the
attribute a knob sets.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BOS_ID, EOS_ID
from model_factories import IMAGE_TOKEN_ID

from backends.knobs import (KnobConfig, KnobError, apply_knobs, kept_tokens, knob_space_from_model, model_parts,
                            pool_vision_tokens, select_vision_tokens, vision_token_scores)

MOE_FAMILIES = ("olmoe", "qwen2_moe", "mixtral", "llava_olmoe")
VISION_FAMILIES = ("llava_olmoe", "llava_llama", "idefics2")
ALL_FAMILIES = ("olmoe", "qwen2_moe", "mixtral", "gpt_neox", "llava_olmoe", "llava_llama", "idefics2")
NUM_LAYERS, NUM_EXPERTS, OWN_TOP_K = 4, 8, 4  # the tiny factories' configs
NATIVE_VISION_TOKENS = 16  # CLIP 32px / 8px patches = 4x4; IDEFICS2 resampler latents = 16
TIER_NAMES = ("low", "medium", "high")
POOL_TIER_TOKENS = {"low": 1, "medium": 4, "high": 16}  # pool mode: native/16, native/4, native
# Resize mode (the default): the encoder sees 16 / 24 / 32 px, i.e. 2x2 / 3x3 / 4x4 patches of 8 px.
TIER_PATCHES = {"low": 4, "medium": 9, "high": 16}


def tier_tokens(name: str, mode: str = "resize") -> dict:
    """Vision tokens the language model sees per tier: pooled counts, the resized grid (LLaVA), or
    the resampler's 16 latents whatever the size (IDEFICS2)."""
    if mode == "pool":
        return POOL_TIER_TOKENS
    return {t: NATIVE_VISION_TOKENS for t in TIER_NAMES} if name == "idefics2" else TIER_PATCHES
TEXT_BEFORE, TEXT_AFTER = [BOS_ID, 10, 11], [12, 13, 14]
MAX_NEW_TOKENS = 3


def make_inputs(name: str, n_vision_tokens: int = NATIVE_VISION_TOKENS, seed: int = 0) -> dict:
    """A prompt with ``n_vision_tokens`` image placeholders (vision families) and its pixels."""
    if name not in VISION_FAMILIES:
        ids = torch.tensor([TEXT_BEFORE + TEXT_AFTER])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ids = torch.tensor([TEXT_BEFORE + [IMAGE_TOKEN_ID] * n_vision_tokens + TEXT_AFTER])
    gen = torch.Generator().manual_seed(seed)
    shape = (1, 1, 3, 32, 32) if name == "idefics2" else (1, 3, 32, 32)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(shape, generator=gen)}


def expected_vision_tokens(name: str, knobs: KnobConfig, mode: str = "resize") -> int:
    n_tier = tier_tokens(name, mode)[knobs.tier] if knobs.tier is not None else NATIVE_VISION_TOKENS
    return max(1, math.ceil(knobs.token_budget * n_tier))


def inputs_for(name: str, knobs: KnobConfig, mode: str = "resize") -> dict:
    return make_inputs(name, expected_vision_tokens(name, knobs, mode) if name in VISION_FAMILIES else 0)


@torch.no_grad()
def last_logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits[:, -1]


@torch.no_grad()
def generate(model, inputs, **kwargs) -> torch.Tensor:
    """Greedy continuation (new token ids only); no min_new_tokens, so EOS first would show as empty."""
    out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0,
                         eos_token_id=EOS_ID, **kwargs)
    return out[0, inputs["input_ids"].shape[1]:]


# ---------------------------------------------------------------------------------------------
# The knob space read from each model's config
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_knob_space_ranges_come_from_the_config(tiny, name):
    space = knob_space_from_model(tiny(name))
    assert space.model_class == type(tiny(name)).__name__
    assert space.num_layers == NUM_LAYERS
    assert space.has_moe == (name in MOE_FAMILIES)
    if space.has_moe:
        assert (space.num_experts, space.full_top_k) == (NUM_EXPERTS, OWN_TOP_K)
    assert space.has_vision == (name in VISION_FAMILIES)
    if space.has_vision:
        assert space.native_vision_tokens == NATIVE_VISION_TOKENS
        assert space.tier_mode == "resize" and space.tiers == tier_tokens(name)
        assert space.tier_sizes == {"low": 16, "medium": 24, "high": 32}
        assert knob_space_from_model(tiny(name), tier_mode="pool").tiers == POOL_TIER_TOKENS


# ---------------------------------------------------------------------------------------------
# MoE top-k: experts per token, counted on the experts modules
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [1, 2, OWN_TOP_K, NUM_EXPERTS])
@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_top_k_sets_experts_per_token_in_every_moe_block_but_the_first(tiny, probe, name, top_k):
    model = tiny(name)
    inputs = inputs_for(name, KnobConfig())
    baseline = last_logits(model, inputs)
    counter = probe(model)
    with apply_knobs(model, KnobConfig(top_k=top_k)):
        logits = last_logits(model, inputs)
    n_tokens = inputs["input_ids"].shape[1]
    assert counter.experts_per_token[0] == {OWN_TOP_K}, "block 1 keeps the model's own top-k"
    assert counter.expert_pairs[0] == n_tokens * OWN_TOP_K
    for block in range(1, NUM_LAYERS):
        assert counter.experts_per_token[block] == {top_k}, f"block {block + 1}"
        assert counter.expert_pairs[block] == n_tokens * top_k
    assert torch.equal(logits, baseline) == (top_k == OWN_TOP_K)


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_top_k_holds_at_every_generation_step(tiny, probe, name):
    model = tiny(name)
    inputs = inputs_for(name, KnobConfig())
    counter = probe(model)
    with apply_knobs(model, KnobConfig(top_k=1)):
        new = generate(model, inputs)
    assert len(new) >= 1
    assert counter.block_calls[1] == len(new)  # one forward per generated token
    assert counter.experts_per_token[0] == {OWN_TOP_K}
    assert all(counter.experts_per_token[b] == {1} for b in range(1, NUM_LAYERS))


# ---------------------------------------------------------------------------------------------
# Depth: which decoder blocks run, and what reaches the final norm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2, NUM_LAYERS])
@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_depth_runs_the_first_blocks_then_the_final_norm(tiny, probe, name, depth):
    model = tiny(name)
    inputs = inputs_for(name, KnobConfig())
    baseline = last_logits(model, inputs)
    counter = probe(model)
    with apply_knobs(model, KnobConfig(depth=depth)):
        logits = last_logits(model, inputs)
    assert counter.executed_blocks == list(range(depth))
    assert all(calls == 1 for calls in counter.block_calls.values())
    # Early exit: the final norm gets block D's output directly.
    assert len(counter.final_norm_inputs) == 1
    assert torch.equal(counter.final_norm_inputs[0], counter.last_block_output)
    assert torch.equal(logits, baseline) == (depth == NUM_LAYERS)


@pytest.mark.parametrize("name", ["olmoe", "gpt_neox", "llava_llama", "idefics2"])
def test_depth_generation_keeps_the_kv_cache_consistent(tiny, probe, name):
    """Cached decoding under early exit equals recomputing the whole sequence at every step."""
    model = tiny(name)
    knobs = KnobConfig(depth=2)
    inputs = inputs_for(name, knobs)
    counter = probe(model)
    with apply_knobs(model, knobs):
        cached = generate(model, inputs, use_cache=True)
        steps = counter.block_calls[0]
        uncached = generate(model, inputs, use_cache=False)
    assert len(cached) >= 1
    assert torch.equal(cached, uncached)
    assert steps == len(cached)
    assert counter.executed_blocks == [0, 1]


# ---------------------------------------------------------------------------------------------
# Vision tier and token budget: the features entering decoder block 1
# ---------------------------------------------------------------------------------------------
def _tower_output_module(model):
    inner = model.model
    return getattr(inner, "multi_modal_projector", None) or inner.connector


def _patch_embedding(model):
    """The encoder's patch embedding: its output grid is the number of patches the tower computes."""
    return next(m for n, m in model.named_modules() if n.endswith("embeddings.patch_embedding"))


@pytest.mark.parametrize("budget", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("tier", ["low", "medium", "high"])
@pytest.mark.parametrize("name", VISION_FAMILIES)
def test_pool_mode_pools_the_full_images_tower_output(tiny, probe, name, tier, budget):
    model = tiny(name)
    space = knob_space_from_model(model, tier_mode="pool")
    knobs = KnobConfig(tier=tier, token_budget=budget)
    k = expected_vision_tokens(name, knobs, "pool")
    inputs = inputs_for(name, knobs, "pool")
    with torch.no_grad():
        native = model.model.get_image_features(
            **{key: v for key, v in inputs.items() if key == "pixel_values"}, return_dict=True).pooler_output
    native = torch.stack(list(native))
    assert native.shape[1] == NATIVE_VISION_TOKENS

    emitted, patches = [], []
    handles = [_tower_output_module(model).register_forward_hook(lambda m, a, out: emitted.append(out.shape[-2])),
               _patch_embedding(model).register_forward_hook(lambda m, a, out: patches.append(out.shape[-2:].numel()))]
    counter = probe(model)
    try:
        with apply_knobs(model, knobs, space):
            last_logits(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert emitted == [NATIVE_VISION_TOKENS] and patches == [16], "pool mode: the tower sees the whole image"
    n_text = len(TEXT_BEFORE) + len(TEXT_AFTER)
    assert counter.first_block_lengths == [n_text + k]
    # The K rows at the placeholder positions are the tier-pooled, budget-selected tower features.
    entering = counter.first_block_inputs[0][0, len(TEXT_BEFORE):len(TEXT_BEFORE) + k]
    expected = select_vision_tokens(pool_vision_tokens(native, POOL_TIER_TOKENS[tier]), k)[0][0]
    torch.testing.assert_close(entering, expected)
    placeholder = model.get_input_embeddings()(torch.tensor(IMAGE_TOKEN_ID))
    assert not torch.isclose(entering, placeholder).all(dim=-1).any()


@pytest.mark.parametrize("budget", [0.5, 1.0])
@pytest.mark.parametrize("tier", ["low", "medium", "high"])
@pytest.mark.parametrize("name", VISION_FAMILIES)
def test_resize_mode_sets_the_resolution_the_encoder_sees(tiny, probe, name, tier, budget):
    """The tier is decided before the tower: the encoder computes fewer patches at lower tiers
    (counted on its patch embedding), and the language model sees the smaller image's tokens."""
    model = tiny(name)
    knobs = KnobConfig(tier=tier, token_budget=budget)
    k = expected_vision_tokens(name, knobs)
    inputs = inputs_for(name, knobs)
    patches, emitted = [], []
    handles = [_patch_embedding(model).register_forward_hook(lambda m, a, out: patches.append(out.shape[-2:].numel())),
               _tower_output_module(model).register_forward_hook(lambda m, a, out: emitted.append(out.shape[-2]))]
    counter = probe(model)
    try:
        with apply_knobs(model, knobs):  # the default space: resize mode
            last_logits(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert patches == [TIER_PATCHES[tier]]
    assert emitted == [tier_tokens(name)[tier]]
    n_text = len(TEXT_BEFORE) + len(TEXT_AFTER)
    assert counter.first_block_lengths == [n_text + k]
    # What enters block 1 is the tower's output on the image resized to the tier's side.
    side = {"low": 16, "medium": 24, "high": 32}[tier]
    pixels = inputs["pixel_values"]
    flat = pixels.reshape(-1, 3, 32, 32)
    resized = torch.nn.functional.interpolate(flat, size=(side, side), mode="bilinear", antialias=True)
    extra = {"interpolate_pos_encoding": True} if name != "idefics2" else {}
    with torch.no_grad():
        tower = model.model.get_image_features(pixel_values=resized.reshape(*pixels.shape[:-2], side, side),
                                               return_dict=True, **extra).pooler_output
    expected = select_vision_tokens(torch.stack(list(tower)), k)[0][0]
    entering = counter.first_block_inputs[0][0, len(TEXT_BEFORE):len(TEXT_BEFORE) + k]
    torch.testing.assert_close(entering, expected)


@pytest.mark.parametrize("name", VISION_FAMILIES)
def test_fewer_vision_tokens_change_the_logits(tiny, name):
    model = tiny(name)
    full = last_logits(model, inputs_for(name, KnobConfig()))
    for knobs in (KnobConfig(tier="medium"), KnobConfig(token_budget=0.5)):
        with apply_knobs(model, knobs):
            reduced = last_logits(model, inputs_for(name, knobs))
        assert not torch.allclose(reduced, full), str(knobs)


def _every_knob_value(name: str) -> list[KnobConfig]:
    values = [KnobConfig()] + [KnobConfig(depth=d) for d in range(1, NUM_LAYERS + 1)]
    if name in MOE_FAMILIES:
        values += [KnobConfig(top_k=k) for k in range(1, NUM_EXPERTS + 1)]
    if name in VISION_FAMILIES:
        values += [KnobConfig(tier=t, token_budget=b) for t in TIER_NAMES for b in (0.25, 0.5, 0.75, 1.0)]
        values += [KnobConfig(token_budget=b) for b in (0.1, 0.5)]
    return values


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_generation_returns_new_tokens_for_every_knob_value(tiny, name):
    """Including K < N vision tokens; decoding with the cache equals decoding without it."""
    model = tiny(name)
    for knobs in _every_knob_value(name):
        inputs = inputs_for(name, knobs)
        with apply_knobs(model, knobs):
            new = generate(model, inputs)
            if name in VISION_FAMILIES and knobs.token_budget < 1:
                assert torch.equal(new, generate(model, inputs, use_cache=False)), str(knobs)
        assert len(new) >= 1 and int(new[0]) != EOS_ID, f"empty answer under {knobs}"


# ---------------------------------------------------------------------------------------------
# Exact restoration on exit
# ---------------------------------------------------------------------------------------------
def _all_knobs(name: str) -> KnobConfig:
    return KnobConfig(tier="medium" if name in VISION_FAMILIES else None,
                      token_budget=0.5 if name in VISION_FAMILIES else 1.0,
                      top_k=2 if name in MOE_FAMILIES else None, depth=2)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_model_is_bit_identical_after_the_context(tiny, name):
    model = tiny(name)
    native = inputs_for(name, KnobConfig())
    before_logits, before_tokens = last_logits(model, native), generate(model, native)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    knobs = _all_knobs(name)
    with apply_knobs(model, knobs):
        inside = last_logits(model, inputs_for(name, knobs))
        generate(model, inputs_for(name, knobs))
    assert not torch.equal(inside[..., :5], before_logits[..., :5])  # the knobs did something
    assert torch.equal(last_logits(model, native), before_logits)
    assert torch.equal(generate(model, native), before_tokens)
    after_state = model.state_dict()
    assert before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_model_is_restored_when_the_body_raises(tiny, name):
    model = tiny(name)
    native = inputs_for(name, KnobConfig())
    before = last_logits(model, native)
    knobs = _all_knobs(name)
    with pytest.raises(RuntimeError, match="body failed"):
        with apply_knobs(model, knobs):
            last_logits(model, inputs_for(name, knobs))
            raise RuntimeError("body failed")
    assert torch.equal(last_logits(model, native), before)


@pytest.mark.parametrize("name", VISION_FAMILIES)
def test_model_is_restored_when_the_model_itself_raises(tiny, name):
    """N placeholders under a K-token tier is the model's own error; the model still comes back whole."""
    model = tiny(name)
    native = inputs_for(name, KnobConfig())
    before = last_logits(model, native)
    with pytest.raises(Exception, match="(?i)image features and image tokens do not match"):
        with apply_knobs(model, KnobConfig(tier="low", depth=3), knob_space_from_model(model, tier_mode="pool")):
            last_logits(model, native)
    assert torch.equal(last_logits(model, native), before)


# ---------------------------------------------------------------------------------------------
# Unsupported knobs and bad values
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, knobs, knob", [
    ("gpt_neox", KnobConfig(top_k=2), "top_k"),
    ("llava_llama", KnobConfig(top_k=2), "top_k"),
    ("idefics2", KnobConfig(top_k=1), "top_k"),
    ("olmoe", KnobConfig(tier="low"), "tier"),
    ("mixtral", KnobConfig(tier="high"), "tier"),
    ("gpt_neox", KnobConfig(tier="medium"), "tier"),
    ("qwen2_moe", KnobConfig(token_budget=0.5), "token_budget"),
])
def test_unsupported_knob_names_the_model_class_and_the_knob(tiny, name, knobs, knob):
    model = tiny(name)
    with pytest.raises(KnobError) as err:
        with apply_knobs(model, knobs):
            pytest.fail("the body must not run")
    assert type(model).__name__ in str(err.value)
    assert repr(knob) in str(err.value)


@pytest.mark.parametrize("name, knobs, fragments", [
    ("olmoe", KnobConfig(top_k=0), ["top_k=0", "[1, 8]"]),
    ("olmoe", KnobConfig(top_k=9), ["top_k=9", "[1, 8]"]),
    ("mixtral", KnobConfig(top_k=-1), ["top_k=-1", "[1, 8]"]),
    ("qwen2_moe", KnobConfig(top_k=2.0), ["top_k=2.0", "[1, 8]"]),
    ("llava_olmoe", KnobConfig(top_k=True), ["top_k=True", "[1, 8]"]),
    ("olmoe", KnobConfig(depth=0), ["depth=0", "[1, 4]"]),
    ("gpt_neox", KnobConfig(depth=5), ["depth=5", "[1, 4]"]),
    ("idefics2", KnobConfig(depth=-2), ["depth=-2", "[1, 4]"]),
    ("llava_llama", KnobConfig(token_budget=0.0), ["token_budget=0.0", "0 < b <= 1"]),
    ("llava_llama", KnobConfig(token_budget=1.5), ["token_budget=1.5", "0 < b <= 1"]),
    ("idefics2", KnobConfig(token_budget=-0.25), ["token_budget=-0.25", "0 < b <= 1"]),
    ("llava_olmoe", KnobConfig(token_budget=float("nan")), ["token_budget=nan", "0 < b <= 1"]),
    ("llava_olmoe", KnobConfig(tier="ultra"), ["'ultra'", "low, medium, high"]),
    ("idefics2", KnobConfig(tier="LOW"), ["'LOW'", "low, medium, high"]),
])
def test_bad_knob_values_name_the_value_and_the_accepted_range(tiny, name, knobs, fragments):
    model = tiny(name)
    space = knob_space_from_model(model)
    for attempt in (lambda: space.validate(knobs), lambda: apply_knobs(model, knobs).__enter__()):
        with pytest.raises(ValueError) as err:
            attempt()
        for fragment in fragments:
            assert fragment in str(err.value)


@pytest.mark.parametrize("tiers", [{"low": 0, "high": 16}, {"low": 4, "high": 17}])
def test_tier_sizes_outside_the_native_count_are_rejected(tiny, tiers):
    with pytest.raises(KnobError, match=r"1\.\.16"):
        knob_space_from_model(tiny("llava_llama"), tiers=tiers, tier_mode="pool")


@pytest.mark.parametrize("name, options, fragment", [
    ("llava_llama", {"tiers": {"low": 5, "high": 16}}, "square number"),
    ("llava_llama", {"tier_sizes": {"low": 12, "high": 32}}, "multiples of the patch size 8"),
    ("llava_llama", {"tiers": {"low": 4, "high": 16}, "tier_sizes": {"low": 24, "high": 32}}, "do not match"),
    ("idefics2", {"tiers": {"low": 4, "high": 16}}, "tier_sizes"),
    ("llava_olmoe", {"tier_mode": "crop"}, "resize, pool"),
])
def test_bad_resize_tiers_are_one_clear_error(tiny, name, options, fragment):
    with pytest.raises(KnobError, match=fragment):
        knob_space_from_model(tiny(name), **options)


def test_resize_tiers_from_sizes_or_token_counts_agree(tiny):
    model = tiny("llava_olmoe")
    by_size = knob_space_from_model(model, tier_sizes={"low": 8, "high": 32})
    by_tokens = knob_space_from_model(model, tiers={"low": 1, "high": 16})
    assert by_size.tiers == by_tokens.tiers == {"low": 1, "high": 16}
    assert by_size.tier_sizes == by_tokens.tier_sizes == {"low": 8, "high": 32}
    assert [by_size.tower_tokens(t) for t in ("low", "high")] == [1, 16]
    assert knob_space_from_model(model, tier_mode="pool").tower_tokens("low") == 16


def test_unsupported_model_class_is_a_clear_error():
    with pytest.raises(KnobError, match="unsupported model class Linear"):
        model_parts(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# The vision-token transforms themselves
# ---------------------------------------------------------------------------------------------
def test_tier_pooling_averages_spatial_neighbours():
    features = torch.randn(2, 16, 3)  # a 4x4 grid
    pooled = pool_vision_tokens(features, 4)
    grid = features.reshape(2, 4, 4, 3)
    top_left = grid[:, :2, :2].reshape(2, 4, 3).mean(dim=1)
    bottom_right = grid[:, 2:, 2:].reshape(2, 4, 3).mean(dim=1)
    torch.testing.assert_close(pooled[:, 0], top_left)
    torch.testing.assert_close(pooled[:, 3], bottom_right)
    assert pool_vision_tokens(features, 16) is features
    assert pool_vision_tokens(torch.randn(1, 6, 3), 3).shape == (1, 3, 3)  # not a square grid: 1-D pooling
    for n_out in (0, 17):
        with pytest.raises(KnobError, match=f"to {n_out}"):
            pool_vision_tokens(features, n_out)


def test_budget_selection_keeps_the_most_informative_tokens_in_order():
    features = torch.randn(1, 10, 4)
    scores = vision_token_scores(features)[0]
    kept, index = select_vision_tokens(features, 3)
    assert index[0].tolist() == sorted(scores.topk(3).indices.tolist())
    assert torch.equal(kept[0], features[0, index[0]])
    for k in (0, 11):
        with pytest.raises(KnobError, match=f"keep {k} of 10"):
            select_vision_tokens(features, k)


@pytest.mark.parametrize("n, budget, k", [(16, 1.0, 16), (16, 0.25, 4), (16, 0.3, 5), (5, 0.5, 3), (16, 0.01, 1)])
def test_kept_tokens_is_the_ceiling_and_at_least_one(n, budget, k):
    assert kept_tokens(n, budget) == k
