"""Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE through ``backend=hf`` on tiny random configs: the backend's
two-stage run equals the model's own forward and ``generate``; batched stage 2 equals unbatched;
Qwen3-VL-MoE's three knobs checked with forward hooks; the MoE in nf4 on the CPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from model_factories import IMAGE_TOKEN_ID, make
from test_hf_task import hf, jsonl_data, one_episode, save_checkpoint  # noqa: F401  (module fixture)

from backends import qwen_vl
from backends.knobs import KnobConfig, KnobError, apply_knobs, knob_space_from_model
from backends.quantized import quantization_report
from backends.registry import load_backend

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


@pytest.fixture(scope="module")
def qwen_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_checkpoints")
    return {name: save_checkpoint(name, root / name) for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_two_stage_run_equals_the_models_own_forward_and_generate(qwen_checkpoints, jsonl_data, name):  # noqa: F811
    backend = load_backend("hf", model=str(qwen_checkpoints[name]), dataset=str(jsonl_data["vision"]),
                           generation={"max_new_tokens": 4, "min_new_tokens": 4})
    model, space = backend.model, backend.knob_space
    assert space.tiers == {"low": 64, "medium": 144, "high": 256}  # (side / (8 px x merge 2))**2
    assert space.tier_sizes == {"low": 128, "medium": 192, "high": 256}
    sample = backend.samples("test")[0]
    inputs = qwen_vl.image_inputs(backend.image_processor, sample.image, space.tier_sizes["high"])
    ids = torch.tensor([backend._prompt_ids(sample)])
    at = int((ids[0] == IMAGE_TOKEN_ID).nonzero()[0])
    ids = torch.cat([ids[:, :at], torch.full((1, 256), IMAGE_TOKEN_ID), ids[:, at + 1:]], dim=1)
    kwargs = dict(input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                  mm_token_type_ids=(ids == IMAGE_TOKEN_ID).int())
    with torch.no_grad():
        reference = model(**kwargs).logits[0, -1]
        generated = model.generate(**kwargs, max_new_tokens=4, min_new_tokens=4, do_sample=False)[0, ids.shape[1]:]
    state = backend.run_stage1(sample, "high")
    payload = state.payload[2]
    with torch.no_grad(), apply_knobs(model, space.resolve(KnobConfig(tier="high")), space):
        hidden = backend._run_blocks(payload.hidden, 1, len(backend.parts.layers), copy.deepcopy(payload.cache),
                                     payload.positions)
        logits = backend.parts.lm_head(backend.parts.final_norm(hidden[:, -1:]))[0, -1]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-4)
    outcome = backend.run_stage2(state, KnobConfig(tier="high"))
    assert outcome.answer == backend.tokenizer.decode(generated, skip_special_tokens=True).strip()


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_stage2_equals_unbatched(qwen_checkpoints, jsonl_data, name):  # noqa: F811
    backend = hf(qwen_checkpoints[name], jsonl_data["vision"])
    space = backend.knob_space
    sample = backend.samples("test")[1]
    for tier, budget in (("low", 1.0), ("medium", 0.5)):
        state = backend.run_stage1(sample, tier, budget)
        assert state.token_counts.vision_tokens == space.vision_tokens(KnobConfig(tier=tier, token_budget=budget))
        configs = [KnobConfig(tier=tier, token_budget=budget, top_k=k, depth=d)
                   for k in (space.top_ks or (None,)) for d in space.depths]
        one_by_one = [backend.run_stage2(state, k) for k in configs]
        batched = backend.run_stage2_batch(state, configs)
        assert [o.answer for o in batched] == [o.answer for o in one_by_one]
        assert [o.token_counts for o in batched] == [o.token_counts for o in one_by_one]


def test_qwen3_vl_moe_three_knobs_seen_by_forward_hooks(qwen_checkpoints, jsonl_data, probe):  # noqa: F811
    """Experts per token in every block (block 1 at the model's own top-k), blocks run, and patches
    entering the vision tower per tier (4 patches per language-model token: merge 2 x 2)."""
    backend = hf(qwen_checkpoints["qwen3_vl_moe"], jsonl_data["vision"])
    space = backend.knob_space
    assert space.has_moe and space.full_top_k == 4 and space.top_ks == (2, 3, 4) and space.depths == (3, 4)
    sample = backend.samples("test")[0]
    watch = probe(backend.model)
    for tier in space.tier_names:
        for top_k, depth in ((2, 3), (3, 4)):
            watch.reset()
            outcome = backend.run(sample, KnobConfig(tier=tier, token_budget=0.5, top_k=top_k, depth=depth))
            assert watch.encoder_patches == [4 * space.tiers[tier]]
            assert watch.first_block_lengths[0] == outcome.token_counts.prompt_tokens + space.tiers[tier] // 2
            assert watch.executed_blocks == list(range(depth))
            assert watch.experts_per_token[0] == {4}
            assert all(watch.experts_per_token[i] == {top_k} for i in range(1, depth))


def test_qwen3_vl_moe_in_nf4_runs_the_envs_and_reports_unquantized_experts(qwen_checkpoints, jsonl_data):  # noqa: F811
    backend = hf(qwen_checkpoints["qwen3_vl_moe"], jsonl_data["vision"], quantization="nf4")
    assert any(type(m).__name__ == "Linear4bit" for m in backend.model.modules())
    assert 0.0 <= one_episode("MultiKnob-v0", backend)["score"] <= 1.0
    assert one_episode("TokenBudget-v0", backend)["knobs"]["token_budget"] in (0.25, 0.5, 0.75, 1.0)
    report = quantization_report(backend.model)
    assert report.quantized.get("experts", 0) == 0 < report.total["experts"]
    assert report.quantized["attention"] > 0


def test_the_family_is_registered_from_its_own_file_like_a_users():
    """Qwen-VL is not in knobs.py's shipped lists: backends/qwen_vl.py registers it through
    register_model_family, and model_parts then finds its decoder and its tower (``model.visual``)."""
    import inspect

    from backends import knobs

    shipped = inspect.getsource(knobs).split("def register_model_family")[0]
    assert not any(name in shipped for name in qwen_vl.FAMILY_CLASSES) and '"visual"' not in shipped
    assert set(qwen_vl.FAMILY_CLASSES) <= set(knobs.SUPPORTED_FAMILIES)
    for name in FAMILIES:
        model = make(name)
        parts = knobs.model_parts(model)
        assert parts.vision_encoder is model.model.visual and parts.layers is model.model.language_model.layers


def test_qwen_tiers_are_checked_against_the_token_grid():
    model = make("qwen3_vl")
    space = knob_space_from_model(model, tier_sizes={"small": 64, "big": 160})
    assert space.tiers == {"small": 16, "big": 100} and space.tier_mode == "resize"
    assert knob_space_from_model(model, tiers={"a": 9, "b": 36}).tier_sizes == {"a": 48, "b": 96}
    with pytest.raises(KnobError, match=r"tier_sizes \{'x': 100\} are invalid.*multiples of .* 16 px"):
        knob_space_from_model(model, tier_sizes={"x": 100})
    with pytest.raises(KnobError, match="tier_mode='pool' is invalid for Qwen3VLForConditionalGeneration"):
        knob_space_from_model(model, tier_mode="pool")
    with pytest.raises(KnobError, match="a square number"):
        knob_space_from_model(model, tiers={"a": 10})


def test_mrope_positions_keep_the_kept_tokens_grid_cells():
    positions, delta = qwen_vl.mrope_positions(2, 3, (1, 4, 4), 2, torch.tensor([0, 3]))
    assert positions.shape == (3, 1, 7)
    assert positions[:, 0].tolist() == [[0, 1, 2, 2, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6]]
    assert delta == (4 + 3) - 7  # the next token continues from the full grid's text positions
    full, full_delta = qwen_vl.mrope_positions(2, 3, (1, 4, 4), 2, None)
    assert full[:, 0, -3:].tolist() == positions[:, 0, -3:].tolist() and full_delta == 4 + 3 - 9
    assert np.array_equal(full[1:, 0, 2:6].numpy(), [[0, 0, 1, 1], [0, 1, 0, 1]] + np.array(2))
