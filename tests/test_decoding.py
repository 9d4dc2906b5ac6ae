"""Decoding-v0 and the decoding backend on the shipped tiny target/draft pair.

The pair (``backends/tiny_lm/{target,draft}``) is the real thing: the target has a chat template,
the draft has none, both share one character tokenizer.
"""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401  (registers Decoding-v0)
from backends.decoding import (DecodingKnobError, DecodingKnobs, DraftTokenizerMismatchError, check_same_tokenizer,
                               load_decoding_backend)
from backends.decoding.backend import TINY_DIR

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pair():
    from backends.registry import load_backend

    return load_backend("decoding")  # the shipped tiny pair, cached per process


@pytest.fixture(scope="module")
def cache_dir(pair, tmp_path_factory):
    """A latency cache holding a short decoding profile of the pair (deterministic, not accurate)."""
    from latency_model.decoding import DecodingProfileSettings, get_decoding_estimator

    root = tmp_path_factory.mktemp("kg-cache")
    get_decoding_estimator(pair, cache_dir=root / "latency", progress=False,
                           settings=DecodingProfileSettings(samples=4, repeats=1, warmup=1))
    return root


@pytest.fixture
def make(pair, cache_dir, monkeypatch):
    monkeypatch.setenv("KNOBGYM_CACHE", str(cache_dir))

    def _make(env_id="Decoding-v0", **kwargs):
        kwargs.setdefault("budget", "30ms")
        return gym.make(env_id, **kwargs)

    return _make


# ------------------------------------------------------------------------------------------------
# the env
# ------------------------------------------------------------------------------------------------
def test_gym_make_passes_check_env(make):
    from gymnasium.utils.env_checker import check_env

    env = make(budget=None)  # the default: the shipped pair, the cached estimator, the suggested budget
    check_env(env.unwrapped, skip_render_check=True)
    space = env.unwrapped.space
    assert env.action_space.nvec.tolist() == space.nvec
    assert [name for name, _ in space.fields] == ["strategy", "num_beams", "temperature", "num_assistant_tokens",
                                                  "chat_template"]


def test_estimated_mode_is_deterministic_and_group_equals_episodes(make):
    env = make()
    actions = [np.array(a) for a in ([0, 0, 0, 0, 0], [1, 1, 0, 0, 0], [2, 0, 1, 0, 1], [3, 0, 0, 2, 0])]
    rewards, infos = env.unwrapped.evaluate_group(5, 30, actions, split="test")
    for action, reward, info in zip(actions, rewards, infos):
        env.reset(options={"sample_id": 5, "budget": 30, "split": "test"})
        _, r, terminated, truncated, step_info = env.step(action)
        assert terminated and not truncated
        assert r == reward and step_info["latency_ms"] == info["latency_ms"]
        assert step_info["answer"] == info["answer"]
    fresh = make()
    assert fresh.unwrapped.evaluate_group(5, 30, actions, split="test")[0].tolist() == rewards.tolist()


def test_env_implements_the_group_protocol_with_one_stage(make):
    import itertools

    from envs.protocols import GroupEnv, group_env

    env = make()
    base = group_env(env)
    assert isinstance(base, GroupEnv)
    assert base.trajectory_nvec == tuple(env.action_space.nvec.tolist())
    assert base.stage_heads == (tuple(range(len(base.trajectory_nvec))),)
    assert base.num_samples("test") == len(base.backend.samples("test"))
    obs, _ = env.reset(options={"sample_id": 3, "budget": 30, "split": "test"})
    assert np.array_equal(base.stage_observation(3, 30.0, "test", 0), obs)
    with pytest.raises(ValueError, match="stage=1 is invalid"):
        base.stage_observation(3, 30.0, "test", 1)
    assert np.array_equal(base.to_env_action([1, 0, 1, 2, 0], 0), np.array([1, 0, 1, 2, 0]))
    # every action of the space (what GRPO's latency features ask at each step): memoised per
    # (input, configuration), so actions naming one configuration get one figure
    actions = list(itertools.product(*[range(n) for n in base.trajectory_nvec]))
    ms = base.estimated_latency_ms(3, actions, "test")
    assert ms.shape == (len(actions),) and (ms > 0).all()
    assert np.array_equal(base.estimated_latency_ms(3, actions, "test"), ms)
    greedy = [i for i, a in enumerate(actions) if a[0] == 0 and a[-1] == 0]
    assert len(set(ms[greedy].tolist())) == 1
    record = base.provenance()
    assert record["model"]["backend"] == "decoding" and record["latency"] == "estimated"
    assert record["knob_space"]["strategies"] == ["greedy", "beam", "sampling", "speculative"]


def test_registry_accepts_declared_backend_contracts_only(pair, monkeypatch):
    from backends import registry
    from backends.decoding import DecodingBackend
    from backends.registry import backend_types, load_backend

    assert DecodingBackend in backend_types()
    assert load_backend(pair) is pair  # a loaded decoding backend passes through like a Backend
    monkeypatch.setitem(registry._FACTORIES, "knobgym-test-undeclared", lambda: object())
    with pytest.raises(ValueError, match="implements no declared backend contract"):
        load_backend("knobgym-test-undeclared")
    with pytest.raises(ValueError, match="needs a vision-language backend"):
        gym.make("MultiKnob-v0", backend=pair, budget="120ms")


def test_info_carries_answer_score_latency_trace_and_acceptance(make):
    env = make()
    _, infos = env.unwrapped.evaluate_group(0, 30, [[0, 0, 0, 0, 0], [1, 1, 0, 0, 0], [3, 0, 0, 1, 0]],
                                            split="test")
    greedy, beam, spec = infos
    for info in infos:
        assert {"answer", "score", "latency_ms", "new_tokens", "violated", "knobs"} <= set(info)
        assert info["latency_ms"] > 0 and info["new_tokens"] >= 1
    assert len(beam["beam_sources"]) == beam["new_tokens"] and max(beam["beam_sources"]) < 4
    assert greedy["beam_sources"] is None and greedy["acceptance_rate"] is None
    assert 0.0 <= spec["acceptance_rate"] <= 1.0 and spec["accepted_per_pass"] >= 0.0
    assert spec["draft_passes"] > 0 and spec["target_passes"] <= spec["new_tokens"]


def test_env_pickles_by_spec_and_reloads(make):
    env = make().unwrapped
    env.reset(seed=3)
    clone = pickle.loads(pickle.dumps(env))
    assert clone.action_space == env.action_space
    assert np.array_equal(clone.np_random.integers(1 << 30, size=4), env.np_random.integers(1 << 30, size=4))
    a = [0, 0, 0, 0, 1]
    assert clone.evaluate_group(1, 30, [a], split="test")[0] == env.evaluate_group(1, 30, [a], split="test")[0]


def test_measured_variant_charges_the_wall_clock(make):
    assert gym.registry["Decoding-measured-v0"].nondeterministic
    env = make("Decoding-measured-v0")
    env.reset(options={"sample_id": 2, "split": "test"})
    _, _, _, _, info = env.step(np.array([0, 0, 0, 0, 0]))
    assert info["measured_ms"] > 0 and info["latency_ms"] == info["measured_ms"]


def test_a_vision_backend_is_a_clear_error(make, pair):
    from backends.registry import load_backend

    with pytest.raises(ValueError, match="needs a decoding backend"):
        make(backend=load_backend("tiny"))


def test_bad_actions_are_clear_errors(make):
    env = make()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="outside the action space"):
        env.step(np.array([9, 0, 0, 0, 0]))


# ------------------------------------------------------------------------------------------------
# decoding semantics
# ------------------------------------------------------------------------------------------------
def _through_eos(sequence, eos: int) -> tuple:
    return tuple(sequence[: sequence.index(eos) + 1]) if eos in sequence else tuple(sequence)


def test_speculative_greedy_returns_exactly_the_targets_greedy_output(pair):
    eos = pair.tokenizer.eos_token_id
    for sample in pair.samples("test")[:12]:
        for chat in (False, True):
            greedy = pair.run(sample, DecodingKnobs("greedy", chat_template=chat))
            for k in (2, 8):
                spec = pair.run(sample, DecodingKnobs("speculative", num_assistant_tokens=k, chat_template=chat))
                assert _through_eos(list(spec.sequence), eos) == _through_eos(list(greedy.sequence), eos)
                assert spec.answer == greedy.answer


def _explicit_beam_search(model, prompt: list[int], num_beams: int, max_new: int, eos: int,
                          length_penalty: float = 1.0) -> tuple[list[int], list[int]]:
    """Beam search written out: full forward per beam, explicit back-pointers.

    Mirrors the search ``generate`` runs (2 * beams candidates per step; candidates ending in EOS
    among the top ``beams`` are finished with score ``sum logp / generated**length_penalty``; the
    best non-finished continue; stop once no running beam can beat the worst finished one).
    """
    running = [(list(prompt), 0.0 if b == 0 else -1e9, []) for b in range(num_beams)]
    finished: list[tuple[float, list[int], list[int]]] = []
    open_ = True
    for step in range(max_new):
        cands = []
        for b, (seq, score, _) in enumerate(running):
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].float(), dim=-1)
            cands += [(score + float(lp), b, tok) for tok, lp in enumerate(logp.tolist())]
        top = sorted(cands, key=lambda c: -c[0])[: 2 * num_beams]
        done = [tok == eos or step == max_new - 1 for _, _, tok in top]
        for rank, ((score, b, tok), d) in enumerate(zip(top, done)):
            if d and rank < num_beams and open_:
                seq, _, src = running[b]
                finished.append((score / (step + 1) ** length_penalty, seq + [tok], src + [b]))
        finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
        order = sorted(range(len(top)), key=lambda i: -(top[i][0] - 1e9 * done[i]))[:num_beams]
        running = [(running[top[i][1]][0] + [top[i][2]], top[i][0] - 1e9 * done[i],
                    running[top[i][1]][2] + [top[i][1]]) for i in order]
        worst = min(f[0] for f in finished) if len(finished) == num_beams else -1e9
        open_ = open_ and running[0][1] / (step + 1) ** length_penalty > worst
        if not open_ or all(done):
            break
    _, seq, src = finished[0]
    return seq[len(prompt):], src


@pytest.mark.parametrize("num_beams", [2, 4])
def test_source_beam_trace_matches_an_explicit_beam_search(pair, num_beams):
    for sample in pair.samples("test")[:8]:
        knobs = DecodingKnobs("beam", num_beams=num_beams)
        out = pair.run(sample, knobs)
        tokens, sources = _explicit_beam_search(pair.model, pair.prompt_ids(sample, False), num_beams,
                                                pair.max_new_tokens, pair.tokenizer.eos_token_id)
        assert list(out.sequence) == tokens
        assert list(out.beam_sources) == sources


def test_chat_template_rule(pair):
    # The target has a template and the action offers the switch; the draft has none.
    assert pair.tokenizer.chat_template is not None
    assert pair.knob_space.chat_options == (False, True)
    sample = pair.sample("test", 0)
    chat = pair.tokenizer.decode(pair.prompt_ids(sample, True))
    plain = pair.tokenizer.decode(pair.prompt_ids(sample, False))
    assert chat == f"<|user|>{sample.question}<|assistant|>" and plain == f"q: {sample.question}\na:"
    # A target without a template: no switch in the space, and asking for it is one clear error.
    no_template = load_decoding_backend(target=str(TINY_DIR / "draft"), draft=None)
    assert no_template.tokenizer.chat_template is None
    assert no_template.knob_space.chat_options == (False,)
    assert "chat_template" not in [name for name, _ in no_template.knob_space.fields]
    with pytest.raises(DecodingKnobError, match="has no chat template"):
        no_template.run(sample, DecodingKnobs("greedy", chat_template=True))


# ------------------------------------------------------------------------------------------------
# bad knobs: one clear error each
# ------------------------------------------------------------------------------------------------
def test_speculative_with_a_draft_of_another_tokenizer_is_an_error(pair, tmp_path):
    from backends.tiny_lm.task import build_tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={"<eos>": 0, "a": 1, "b": 2}, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")
    with pytest.raises(DraftTokenizerMismatchError, match="different tokenizer than the target"):
        check_same_tokenizer(pair.tokenizer, other, "other-draft")
    # The same tokenizer without the chat template is still the same tokenizer.
    check_same_tokenizer(pair.tokenizer, build_tokenizer(None))
    # Loading a pair whose draft has another tokenizer fails at load, naming the draft.
    pair.model.save_pretrained(tmp_path / "draft")
    other.save_pretrained(tmp_path / "draft")
    with pytest.raises(DraftTokenizerMismatchError, match="draft"):
        load_decoding_backend(draft=str(tmp_path / "draft"))


def test_beams_above_the_limit_are_an_error(pair):
    with pytest.raises(DecodingKnobError, match="num_beams=8 is outside the model's limit; accepted: beam widths 2..4"):
        pair.run(pair.sample("test", 0), DecodingKnobs("beam", num_beams=8))
    with pytest.raises(DecodingKnobError, match="above the model's limit"):
        load_decoding_backend(beams=(2, 8), max_beams=4)


def test_speculative_without_a_draft_is_an_error():
    no_draft = load_decoding_backend(draft=None)
    assert "speculative" not in no_draft.knob_space.strategies
    with pytest.raises(DecodingKnobError, match="needs a draft model"):
        no_draft.run(no_draft.sample("test", 0), DecodingKnobs("speculative", num_assistant_tokens=2))


def test_missing_model_is_one_clear_error(tmp_path):
    from backends.loading import ModelNotAvailableError, SpecError

    with pytest.raises(ModelNotAvailableError, match="never downloads"):
        load_decoding_backend(target="knobgym-test/not-a-cached-model", draft=None)


@pytest.mark.parametrize("preset", ["tiny-decoding", "qwen2.5-3b-decoding"])
def test_backend_presets_load_offline_or_say_how_to_get_the_model(preset):
    import yaml
    from pathlib import Path

    from backends.loading import ModelNotAvailableError, SpecError

    from backends.decoding import DecodingBackend
    from backends.registry import load_backend

    conf = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "backend" / f"{preset}.yaml").read_text())
    assert conf["name"] == "decoding"
    if preset == "tiny-decoding":  # through the registry, like train.py's backend=tiny-decoding
        backend = load_backend(conf)
        assert isinstance(backend, DecodingBackend) and backend.knob_space.strategies[-1] == "speculative"
        return
    try:
        backend = load_backend(conf)
    except ModelNotAvailableError as exc:  # not in this machine's Hugging Face cache: one clear error
        assert "Qwen/Qwen2.5-3B-Instruct" in str(exc) and "hf download" in str(exc)
    except SpecError as exc:  # a CUDA preset on a machine without CUDA: one clear error before any load
        assert "needs CUDA" in str(exc)
    else:  # a machine that has both models: the pair shares one tokenizer
        assert "speculative" in backend.knob_space.strategies


# ------------------------------------------------------------------------------------------------
# the latency estimator
# ------------------------------------------------------------------------------------------------
def test_decoding_estimator_is_cached_and_deterministic_across_loads(pair, cache_dir):
    from latency_model.decoding import decoding_cache_path, get_decoding_estimator, held_out_report

    path = decoding_cache_path(pair, cache_dir / "latency")
    assert path.is_file()
    a = get_decoding_estimator(pair, cache_dir=cache_dir / "latency", profile_if_missing=False)
    b = get_decoding_estimator(pair, cache_dir=cache_dir / "latency", profile_if_missing=False)
    configs = pair.knob_space.configurations()
    counts = [pair.expected_token_counts(pair.sample("test", 0), k) for k in configs]
    pa, pb = a.predict(configs, counts), b.predict(configs, counts)
    assert np.array_equal(pa, pb) and (pa > 0).all()
    # one row at a time equals the batch (a group and separate episodes get the same latency)
    assert np.array_equal(np.concatenate([a.predict([c], [n]) for c, n in zip(configs, counts)]), pa)
    assert set(a.acceptance) == {(k, chat) for k in (2, 4, 8) for chat in (False, True)}
    report = held_out_report(a.profile)
    assert report.held_out_rows > 0 and np.isfinite(report.estimator.mape)


def test_tiny_pair_training_resumes_from_its_last_checkpoint(tmp_path, capsys):
    import json

    from backends.tiny_lm.train import main

    common = ["--model", "draft", "--batch-size", "2", "--save-every", "1", "--work-dir", str(tmp_path / "work"),
              "--out", str(tmp_path / "out")]
    main(common + ["--steps", "2"])
    assert json.loads((tmp_path / "work" / "draft-seed0" / "progress.json").read_text())["step"] == 2
    main(common + ["--steps", "3"])
    assert "resuming from step 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "training.json").read_text())["steps"] == 3
    assert not [p for p in (tmp_path / "work").iterdir() if p.name.startswith(".")]  # no staging folders left
