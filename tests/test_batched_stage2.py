"""Batched stage 2: the members of a group sharing a stage-1 state run as one batch, and every row
gets what its own unbatched run gets (answers, scores, token counts; logits up to float rounding).

Every supported architecture's tiny random model is checked with rows of mixed top-k and depth in
one batch; hooks check the computation itself (experts per token per row, rows entering each
block); the runner's memo and the measured-latency path (unbatched) are checked too.
"""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
import pytest
import torch
from test_hf_backend import (ALL_FAMILIES, MOE_FAMILIES, VISION_FAMILIES, WordTask, cache_tensors,
                             image_processor, same_outcome)
from test_runner import CountingBackend

from backends.base import Sample
from backends.hf import HFBackend
from backends.knobs import KnobConfig, model_parts
from backends.loading import GenerationSettings, LoadedModel, ModelSpec
from backends.runner import StageRunner

EOS_ID = 1
#: largest |batched - unbatched| logit accepted (float32 rounding of batched matrix products)
LOGIT_TOLERANCE = 1e-4


@pytest.fixture
def make_backend(tiny, word_tokenizer):
    def build(name: str, generation: GenerationSettings = GenerationSettings(max_new_tokens=4)) -> HFBackend:
        loaded = LoadedModel(tiny(name), word_tokenizer, image_processor(name), ModelSpec(model=f"tiny/{name}"),
                             revision_loaded="test")
        template = "<image> {question}" if name in VISION_FAMILIES else "{question}"
        return HFBackend(loaded, WordTask(), generation, prompt_template=template, name="test")

    return build


def mixed_rows(name: str, tier: str | None, token_budget: float = 1.0) -> list[KnobConfig]:
    """Rows of one stage-1 state with mixed top-k and depth (a duplicate and depth 1 included)."""
    moe = name in MOE_FAMILIES
    pairs = [(4, 4), (1, 2), (2, 4), (3, 1), (1, 3), (2, 4), (4, 2)] if moe else \
        [(None, 4), (None, 2), (None, 1), (None, 3), (None, 4)]
    return [KnobConfig(tier=tier, token_budget=token_budget, top_k=k, depth=d) for k, d in pairs]


def stage1_cases(name: str) -> list[tuple[str | None, float]]:
    return [("low", 1.0), ("high", 0.5), ("high", 1.0)] if name in VISION_FAMILIES else [(None, 1.0)]


class LogitRecorder:
    """Every LM-head output of the model (one tensor ``[rows, 1, vocab]`` per decoding step)."""

    def __init__(self, backend: HFBackend):
        self.calls: list[torch.Tensor] = []
        self._handle = backend.parts.lm_head.register_forward_hook(
            lambda module, args, out: self.calls.append(out[:, -1].detach().float().clone()))

    def take(self) -> list[torch.Tensor]:
        calls, self.calls = self.calls, []
        return calls

    def remove(self) -> None:
        self._handle.remove()


def batched_and_unbatched(backend: HFBackend, state, rows: list[KnobConfig]):
    """Outcomes of both paths and the largest logit difference over the steps where every row was
    still in the batch (rows are ordered deepest first inside the batch)."""
    recorder = LogitRecorder(backend)
    try:
        batched = backend.run_stage2_batch(state, rows)
        batch_logits = recorder.take()
        unbatched, single_logits = [], []
        for knobs in rows:
            unbatched.append(backend.run_stage2(state, knobs))
            single_logits.append(recorder.take())
    finally:
        recorder.remove()
    order = sorted(range(len(rows)), key=lambda r: -backend.knob_space.resolve(rows[r]).depth)
    worst = 0.0
    for step, logits in enumerate(batch_logits):
        if logits.shape[0] != len(rows):
            break
        for position, r in enumerate(order):
            worst = max(worst, float((logits[position] - single_logits[r][step][0]).abs().max()))
    return batched, unbatched, worst


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_batched_rows_equal_their_unbatched_runs_on_every_family(make_backend, name):
    backend = make_backend(name)
    sample = backend.samples("test")[2]
    for tier, token_budget in stage1_cases(name):
        state = backend.run_stage1(sample, tier, token_budget)
        before = [t.clone() for t in cache_tensors(state.payload[2].cache)] + [state.payload[2].hidden.clone()]
        rows = mixed_rows(name, tier, token_budget)
        batched, unbatched, worst = batched_and_unbatched(backend, state, rows)
        for knobs, b, u in zip(rows, batched, unbatched):
            assert same_outcome(b, u), f"{name} {knobs}: batched {b.answer!r} vs unbatched {u.answer!r}"
            assert b.new_tokens >= 1
        assert worst <= LOGIT_TOLERANCE, f"{name}: largest logit difference {worst:.2e}"
        after = cache_tensors(state.payload[2].cache) + [state.payload[2].hidden]
        assert len(before) == len(after) and all(torch.equal(x, y) for x, y in zip(before, after))


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_each_row_computes_its_own_top_k_experts_and_its_own_blocks(make_backend, name):
    backend = make_backend(name)
    parts = model_parts(backend.model)
    sample = backend.samples("test")[1]
    tier = "high" if name in VISION_FAMILIES else None
    state = backend.run_stage1(sample, tier)
    rows = mixed_rows(name, tier)
    resolved = [backend.knob_space.resolve(k) for k in rows]
    order = sorted(range(len(rows)), key=lambda r: -resolved[r].depth)  # the batch's row order
    seen_experts: dict[int, list[torch.Tensor]] = {}
    seen_rows: dict[int, list[int]] = {}

    def on_experts(index, num_experts, module, args, output):
        seen_experts.setdefault(index, []).append((args[1] < num_experts).sum(dim=-1))

    def on_block(index, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen_rows.setdefault(index, []).append(int(hidden.shape[0]))

    handles = []
    for index, layer in enumerate(parts.layers):
        handles.append(layer.register_forward_pre_hook(functools.partial(on_block, index), with_kwargs=True))
        for module in layer.modules():
            if type(module).__name__.endswith("Experts"):
                handles.append(module.register_forward_hook(functools.partial(on_experts, index, module.num_experts)))
    try:
        backend.run_stage2_batch(state, rows)
    finally:
        for handle in handles:
            handle.remove()
    prompt_len = state.payload[2].prompt_len
    for index in range(1, len(parts.layers)):
        running = [r for r in order if resolved[r].depth > index]  # deepest first: a prefix of the batch
        assert seen_rows.get(index, [0])[0] == len(running), f"block {index}"
        if not running:
            continue
        per_token = seen_experts[index][0]  # the stage-2 prefill: every running row's prompt tokens
        assert per_token.shape[0] == len(running) * prompt_len
        expected = torch.tensor([resolved[r].top_k for r in running]).repeat_interleave(prompt_len)
        assert torch.equal(per_token.cpu(), expected), f"block {index}: experts per token per row"
        for step_counts in seen_experts[index][1:]:  # decoding steps: one token per running row
            assert torch.equal(step_counts.cpu(), expected[::prompt_len][:step_counts.shape[0]])
    # block 1 keeps the model's own top-k for every row (it belongs to stage 1)
    assert all(bool((c == backend.knob_space.full_top_k).all()) for c in seen_experts[0])


def test_rows_stop_on_their_own_eos_and_honour_min_new_tokens(make_backend):
    backend = make_backend("llava_olmoe", GenerationSettings(max_new_tokens=6, min_new_tokens=2))
    # EOS wins whenever a row's own best token is a multiple of 3: a pure function of that row's
    # logits, the same in both paths, so rows stop at different steps.
    head = backend.parts.lm_head

    def eos_rule(module, args, out):
        out = out.clone()
        out[..., EOS_ID] = torch.where(out.argmax(-1) % 3 == 0, out.max(-1).values + 1.0, out[..., EOS_ID])
        return out

    handle = head.register_forward_hook(eos_rule)
    try:
        lengths = set()
        for sample in backend.samples("test"):
            state = backend.run_stage1(sample, "medium")
            rows = mixed_rows("llava_olmoe", "medium")
            batched = backend.run_stage2_batch(state, rows)
            for knobs, b in zip(rows, batched):
                assert same_outcome(b, backend.run_stage2(state, knobs)), str(knobs)
                assert b.new_tokens >= 2
                lengths.add(b.new_tokens)
    finally:
        handle.remove()
    assert len(lengths) > 1  # the rule did stop rows at different lengths


def test_sampled_rows_draw_what_their_unbatched_runs_draw(make_backend):
    backend = make_backend("llava_olmoe", GenerationSettings(max_new_tokens=5, do_sample=True, temperature=1.5,
                                                             top_p=0.9, seed=3))
    answers = set()
    for sample in backend.samples("test")[:2]:
        state = backend.run_stage1(sample, "low")
        rows = mixed_rows("llava_olmoe", "low")
        for knobs, b in zip(rows, backend.run_stage2_batch(state, rows)):
            assert same_outcome(b, backend.run_stage2(state, knobs)), str(knobs)
            answers.add(b.answer)
    assert len(answers) > 1


def test_nonfinite_rows_are_flagged_like_unbatched_runs(make_backend):
    backend = make_backend("olmoe")
    handle = backend.parts.lm_head.register_forward_hook(lambda m, a, out: torch.full_like(out, float("nan")))
    try:
        state = backend.run_stage1(backend.samples("test")[0], None)
        outcomes = backend.run_stage2_batch(state, mixed_rows("olmoe", None))
    finally:
        handle.remove()
    assert all(o.nonfinite_logits and o.empty_output and o.score == 0.0 for o in outcomes)


def test_the_shipped_tiny_model_batched_equals_unbatched(tiny_backend):
    space = tiny_backend.knob_space
    rng = np.random.default_rng(0)
    for sample_id in range(3):
        sample = tiny_backend.sample("test", sample_id)
        for tier in space.tier_names:
            state = tiny_backend.run_stage1(sample, tier)
            rows = [KnobConfig(tier=tier, top_k=int(rng.choice(space.top_ks)), depth=int(rng.choice(space.depths)))
                    for _ in range(8)]
            batched, unbatched, worst = batched_and_unbatched(tiny_backend, state, rows)
            for knobs, b, u in zip(rows, batched, unbatched):
                assert same_outcome(b, u), str(knobs)
            assert worst <= LOGIT_TOLERANCE


def test_batch_rows_must_match_the_stage1_state(make_backend):
    backend = make_backend("llava_olmoe")
    state = backend.run_stage1(backend.samples("test")[0], "low")
    with pytest.raises(ValueError, match="do not match the stage-1 state"):
        backend.run_stage2_batch(state, [KnobConfig(tier="low"), KnobConfig(tier="high")])
    assert backend.run_stage2_batch(state, []) == []


# ---------------------------------------------------------------------------------------------
def test_runner_batches_per_stage1_state_and_fills_the_memo():
    backend = CountingBackend()
    runner = StageRunner(backend, memoise_outcomes=True, batch_stage2=True)
    sample = Sample(0, "train", "q", "a")
    group = [KnobConfig(tier="low", top_k=1, depth=1), KnobConfig(tier="high", top_k=2, depth=2),
             KnobConfig(tier="low", top_k=2, depth=1), KnobConfig(tier="low", top_k=1, depth=1),
             KnobConfig(tier="high", top_k=2, depth=2)]
    outcomes = runner.run_group(sample, group)
    assert [o.knobs for o in outcomes] == [backend.knob_space.resolve(k) for k in group]
    assert backend.stage1_calls == 2  # one stage 1 per tier
    assert [len(batch) for batch in backend.batch_calls] == [2]  # the distinct low-tier members
    assert backend.stage2_calls == 3  # a lone distinct member (high) runs through run_stage2
    again = runner.run_group(sample, group + [KnobConfig(tier="high", top_k=1, depth=2)])
    assert backend.stage2_calls == 4 and len(backend.batch_calls) == 1  # only the new member ran
    assert all(a is b for a, b in zip(again, outcomes))  # memoised outcomes are reused
    assert runner.run(sample, group[1]) is outcomes[1]  # and shared with single runs


def test_runner_without_batching_runs_each_member_alone():
    backend = CountingBackend()
    runner = StageRunner(backend, memoise_outcomes=False)
    sample = Sample(0, "train", "q", "a")
    group = [KnobConfig(tier="low", top_k=1, depth=1)] * 3 + [KnobConfig(tier="high")]
    runner.run_group(sample, group)
    assert backend.batch_calls == [] and backend.stage2_calls == 4  # identical members each timed


# ---------------------------------------------------------------------------------------------
def test_group_evaluation_batches_in_estimated_mode_and_not_in_measured_mode(tiny_backend, tiny_estimator):
    import envs  # noqa: F401

    calls = []
    original = tiny_backend.run_stage2_batch
    tiny_backend.run_stage2_batch = lambda state, rows: calls.append(len(rows)) or original(state, rows)
    actions = [[0, 0, 0], [0, 4, 4], [0, 1, 3], [2, 2, 2], [2, 3, 1]]
    try:
        estimated = gym.make("MultiKnob-v0", backend=tiny_backend, estimator=tiny_estimator, budget="80ms").unwrapped
        estimated.clear_run_cache()
        rewards, infos = estimated.evaluate_group(4, 80.0, actions)
        assert sorted(calls) == [2, 3]  # one batch per tier
        separate = []
        for action in actions:
            estimated.clear_run_cache()
            estimated.reset(options={"sample_id": 4, "budget": "80ms"})
            estimated.step(action)
            separate.append(estimated.step(action))
        assert np.array_equal(rewards, [s[1] for s in separate])
        for info, (*_, step_info) in zip(infos, separate):
            assert info == {key: step_info[key] for key in info}
        calls.clear()
        measured = gym.make("MultiKnob-measured-v0", backend=tiny_backend, estimator=tiny_estimator,
                            budget="80ms").unwrapped
        _, infos = measured.evaluate_group(4, 80.0, actions)
        assert calls == [] and all(info["measured_ms"] > 0 for info in infos)
        token_env = gym.make("TokenBudget-v0", backend=tiny_backend, estimator=tiny_estimator, budget="80ms").unwrapped
        token_env.clear_run_cache()
        token_env.evaluate_group(4, 80.0, [[0], [1], [3]])
        assert calls == []  # each fraction is its own stage-1 state: nothing to batch
    finally:
        del tiny_backend.run_stage2_batch


@pytest.mark.parametrize("name", ("olmoe", "qwen2_moe", "mixtral"))
def test_single_pass_routing_equals_each_top_k_through_the_router_itself(tiny, name):
    from backends.knobs import RowTopK, knob_space_from_model

    model = tiny(name)
    space = knob_space_from_model(model)
    router = model_parts(model).routers(1)[-1]  # the innermost (Mixtral's block carries top_k too)
    assert type(router).__name__.endswith("TopKRouter")
    hidden = torch.randn(4 * 3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    results = []
    own_top_k = router.top_k
    try:
        for vectorised in (True, False):
            rows = RowTopK(space.num_experts)
            rows.vectorised, rows.tokens_per_row = vectorised, 3
            rows.set_rows([1, 4, 2, 4])
            results.append(rows.route(router, router.forward, [], hidden))
    finally:
        router.top_k = own_top_k
    (logits_a, weights_a, index_a), (logits_b, weights_b, index_b) = results
    assert torch.equal(index_a, index_b)
    assert torch.equal(logits_a, logits_b) and torch.allclose(weights_a, weights_b, atol=1e-7, rtol=0)
    assert ((index_a < space.num_experts).sum(-1) == torch.tensor([1, 4, 2, 4]).repeat_interleave(3)).all()
