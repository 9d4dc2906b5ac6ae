"""Latency estimator: features, profiling design, fitting, files, cache and report on a fake backend.

The fake backend's latency is a known function of knobs and token counts (per-block overhead
plus per-expert-call cost, as on a small model on CPU) with multiplicative jitter; it reports it
as ``Outcome.measured_ms`` so the profiles here are deterministic (``clock="outcome"``).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.base import Sample
from backends.knobs import KnobConfig, KnobSpace
from backends.base import Backend
from backends.outcome import Outcome, Stage1State, TokenCounts, expected_token_counts
from backends.io import CorruptFileError
from latency_model import (FEATURE_NAMES, METHODS, SELECTION_RULE, CostFeatures, EstimatorFileError,
                           EstimatorMismatchWarning, LatencyEstimator, NoisyProfileWarning, ProfileSettings,
                           fit_estimator, get_estimator, held_out_report, identity_key, profile_backend,
                           read_profile)
from latency_model.__main__ import main as cli_main
from latency_model.__main__ import parse_overrides
from latency_model.cache import cache_paths
from latency_model.features import STAGE1_FEATURE_NAMES
from latency_model.profile import CSV_COLUMNS, RunTimer, design, device_fingerprint
from latency_model.report import accuracy

SPACE = KnobSpace(model_class="FakeVLM", tiers={"low": 4, "medium": 9, "high": 36}, native_vision_tokens=36,
                  token_budgets=(0.25, 0.5, 1.0), top_ks=(2, 3, 4), full_top_k=4, num_experts=8, depths=(3, 4, 5),
                  num_layers=5)
COST_PARAMS = {"hidden_size": 16.0, "intermediate_size": 32.0, "expert_intermediate_size": 8.0, "num_layers": 5.0,
               "num_experts": 8.0, "full_top_k": 4.0, "vocab_size": 50.0, "vision_layers": 2.0,
               "vision_hidden": 16.0, "native_vision_tokens": 36.0}
FAST = ProfileSettings(points=120, repeats=2, warmup=2, samples=20, clock="outcome")


class FakeBackend:
    """A backend without a model: latency is a known function of knobs and token counts, plus jitter."""

    question_types = ("count", "color")
    summary_dim = 4
    question_feature_dim = 0

    def question_features(self, sample):
        return np.zeros(0, dtype=np.float32)

    def __init__(self, jitter: float = 0.01, seed: int = 0, sleep: bool = False, name: str = "fake"):
        self.knob_space = SPACE
        self.jitter, self.sleep, self.name = jitter, sleep, name
        self.rng = np.random.default_rng(seed)
        self.runs = 0
        words = ("what", "colour", "is", "the", "small", "shape", "left", "of", "red", "square")
        self._samples = [Sample(sample_id=i, split="validation", question=" ".join(words[: 2 + (7 * i) % 9]),
                                reference="red") for i in range(60)]

    expected_new_tokens_by_type = {None: 2}
    device = torch.device("cpu")

    def identity(self) -> dict:
        return {"backend": self.name, "model": "fake-vlm", "revision": "1"}

    def cost_params(self) -> dict:
        return dict(COST_PARAMS)

    def recorded_estimator_file(self):
        return None

    def samples(self, split: str):
        return self._samples

    def sample(self, split: str, sample_id: int) -> Sample:
        return self._samples[sample_id]

    def prompt_tokens(self, sample: Sample) -> int:
        return len(sample.question.split()) + 2

    def expected_token_counts(self, sample: Sample, knobs: KnobConfig) -> TokenCounts:
        return expected_token_counts(self, sample, knobs)

    @staticmethod
    def true_ms(knobs: KnobConfig, counts: TokenCounts) -> tuple[float, float]:
        """(whole run, stage 1) milliseconds without jitter."""
        tokens = counts.prompt_tokens + counts.vision_tokens
        stage1 = 0.4 + 0.01 * counts.vision_tokens_full + 0.004 * tokens * 4
        blocks = knobs.depth * (1 + counts.new_tokens)
        experts = tokens * (4 + (knobs.depth - 1) * knobs.top_k) + counts.new_tokens * knobs.depth * knobs.top_k
        return stage1 + 0.05 * blocks + 0.003 * experts, stage1

    def _counts(self, sample: Sample, knobs: KnobConfig) -> TokenCounts:
        return TokenCounts(prompt_tokens=self.prompt_tokens(sample), vision_tokens_full=36,
                           vision_tokens=self.knob_space.vision_tokens(knobs), new_tokens=1 + sample.sample_id % 4)

    def run_stage1(self, sample: Sample, tier, token_budget: float = 1.0) -> Stage1State:
        counts = self._counts(sample, KnobConfig(tier=tier, token_budget=token_budget))
        counts.new_tokens = 0
        stage1 = self.true_ms(KnobConfig(tier=tier, top_k=4, depth=5), counts)[1]
        return Stage1State(sample.sample_id, tier, counts, np.zeros(4, np.float32), stage1,
                           payload=(sample, token_budget))

    def run_stage2(self, state: Stage1State, knobs: KnobConfig) -> Outcome:
        return self.run(state.payload[0], knobs)

    def run_stage2_batch(self, state: Stage1State, knobs_list) -> list[Outcome]:
        return [self.run_stage2(state, k) for k in knobs_list]

    def run(self, sample: Sample, knobs: KnobConfig) -> Outcome:
        self.runs += 1
        knobs = self.knob_space.resolve(knobs)
        counts = self._counts(sample, knobs)
        total, stage1 = self.true_ms(knobs, counts)
        noise = 1.0 + self.jitter * self.rng.standard_normal()
        if self.sleep:
            time.sleep(total * noise / 1000.0)
        return Outcome(answer="red", reference=sample.reference, score=1.0, token_counts=counts,
                       measured_ms=total * noise, stage1_ms=stage1 * noise, knobs=knobs)


class ExplodingBackend(FakeBackend):
    """Same identity as FakeBackend but refuses to run: proves a cache hit does not profile."""

    def run(self, sample, knobs):
        raise AssertionError("profiling happened on a cache hit")


@pytest.fixture(scope="module")
def fake_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "fake.csv"
    return profile_backend(FakeBackend(), FAST, path, progress=False), path


@pytest.fixture(scope="module")
def fitted(fake_profile):
    return fit_estimator(fake_profile[0], source=str(fake_profile[1]))


def _counts(prompt=5, full=36, vision=36, new=2):
    return TokenCounts(prompt, full, vision, new)


# --- features ------------------------------------------------------------------------------
def _row(knobs: KnobConfig, counts: TokenCounts) -> dict:
    values = CostFeatures(SPACE, COST_PARAMS).compute([knobs], [counts])[0]
    return dict(zip(FEATURE_NAMES, values))


@pytest.mark.parametrize("knob,low,high,grows", [
    ("tier", "low", "high", ("tier_index", "tier_tokens")),
    ("token_budget", 0.25, 1.0, ("token_budget",)),
    ("top_k", 2, 4, ("top_k", "prefill_linear_flops", "prefill_expert_calls", "prefill_active_experts",
                     "decode_expert_calls", "decode_linear_flops", "weight_elements_read", "total_flops")),
    ("depth", 3, 5, ("depth", "prefill_linear_flops", "prefill_attention_flops", "prefill_expert_calls",
                     "decode_attention_flops", "decode_expert_calls", "block_calls", "total_flops")),
])
def test_every_knob_moves_its_features(knob, low, high, grows):
    base = KnobConfig(tier="medium", token_budget=0.5, top_k=3, depth=4)
    counts = _counts(vision=5)
    small, large = _row(base.replace(**{knob: low}), counts), _row(base.replace(**{knob: high}), counts)
    for name in grows:
        assert large[name] > small[name], name
    untouched = {"prompt_tokens", "vision_tokens_full", "vision_tokens", "new_tokens", "vision_flops", "lm_head_flops"}
    for name in untouched:
        assert large[name] == small[name], name


def test_token_counts_move_stage_features():
    knobs = KnobConfig(tier="high", top_k=3, depth=4)
    short, long_ = _row(knobs, _counts(vision=9, new=1)), _row(knobs, _counts(vision=36, new=3))
    for name in ("prefill_tokens", "prefill_linear_flops", "prefill_attention_flops", "decode_linear_flops",
                 "decode_attention_flops", "block_calls", "lm_head_flops"):
        assert long_[name] > short[name], name


def test_expert_calls_are_tokens_times_top_k_times_blocks():
    row = _row(KnobConfig(tier="high", top_k=3, depth=4), _counts(prompt=5, vision=36, new=2))
    tokens = 5 + 36
    # Block 1 runs the model's own top-k (4); blocks 2..4 run top-k 3.
    assert row["prefill_expert_calls"] == tokens * (4 + 3 * 3)
    assert row["decode_expert_calls"] == 2 * (4 + 3 * 3)
    assert row["block_calls"] == 4 * (1 + 2)


def test_none_knobs_resolve_to_the_models_own():
    explicit = _row(KnobConfig(tier="high", token_budget=1.0, top_k=4, depth=5), _counts())
    implicit = _row(KnobConfig(), _counts())
    assert explicit == implicit


def test_stage1_features_follow_vision_tokens():
    features = CostFeatures(SPACE, COST_PARAMS)
    rows = features.compute_stage1(["low", KnobConfig(tier="high")], [_counts(vision=4), _counts(vision=36)])
    assert rows.shape == (2, len(STAGE1_FEATURE_NAMES))
    assert (rows[1] >= rows[0]).all() and rows[1, STAGE1_FEATURE_NAMES.index("total_flops")] > rows[0, -1]


@pytest.mark.parametrize("knobs,message", [
    (KnobConfig(tier="ultra"), "unknown vision tier 'ultra'"),
    (KnobConfig(top_k=9), "top_k=9 is invalid"),
    (KnobConfig(depth=6), "depth=6 is invalid"),
])
def test_bad_knobs_are_named(knobs, message):
    with pytest.raises(ValueError, match=message):
        CostFeatures(SPACE, COST_PARAMS).compute([knobs], [_counts()])


def test_bad_cost_params_and_counts_are_named():
    with pytest.raises(ValueError, match="unknown cost_params keys \\['hidden'\\]"):
        CostFeatures(SPACE, {"hidden": 3.0})
    with pytest.raises(ValueError, match="got 2 configs but 1 token counts"):
        CostFeatures(SPACE, COST_PARAMS).compute([KnobConfig(), KnobConfig()], [_counts()])
    with pytest.raises(ValueError, match="token_counts array has shape"):
        CostFeatures(SPACE, COST_PARAMS).compute([KnobConfig()], np.zeros((1, 3)))
    with pytest.warns(UserWarning, match="cost_params lack"):
        CostFeatures(SPACE, {})


# --- profiling design and CSV -----------------------------------------------------------------
def test_design_holds_out_whole_configs_and_samples():
    points = design(SPACE, FakeBackend().samples("validation"), FAST)
    assert len(points) == FAST.points
    fit = [p for p in points if not p.holdout]
    held = [p for p in points if p.holdout]
    assert held and fit
    assert not {p.knobs for p in fit} & {p.knobs for p in held}
    assert not {p.sample_index for p in fit} & {p.sample_index for p in held}
    # Every level of every knob is covered in the fitted part, about equally often.
    for attr, levels in (("tier", SPACE.tier_names), ("token_budget", SPACE.token_budgets),
                         ("top_k", SPACE.top_ks), ("depth", SPACE.depths)):
        counts = [sum(getattr(p.knobs, attr) == level for p in fit) for level in levels]
        assert min(counts) > 0 and max(counts) - min(counts) <= 2, (attr, counts)


def test_profile_csv_round_trip(fake_profile):
    profile, path = fake_profile
    again = read_profile(path)
    assert again.rows == profile.rows
    assert again.knob_space == SPACE and again.cost_params == COST_PARAMS
    assert again.device == json.loads(json.dumps({**device_fingerprint(), "speed_probe": profile.device["speed_probe"]}))
    assert path.read_text().startswith("# format: ")
    # held-out points, the report's ground truth, are timed 3 x repeats times (the default)
    assert all(len(r["latency_runs_ms"].split(";")) == (3 if r["holdout"] else 1) * FAST.repeats for r in again.rows)


def test_wall_clock_profile_times_each_run(tmp_path):
    backend = FakeBackend(sleep=True)
    settings = ProfileSettings(points=6, repeats=2, warmup=1, samples=6, clock="wall", remeasure_rounds=0)
    profile = profile_backend(backend, settings, tmp_path / "p.csv", progress=False)
    held_out = int(profile.holdout.sum())
    assert 0 < held_out < settings.points
    fitting = settings.points - held_out
    assert backend.runs == settings.warmup + fitting * settings.repeats + held_out * 3 * settings.repeats
    assert all(r["latency_ms"] > 0 and r["backend_ms"] > 0 for r in profile.rows)


def test_held_out_points_get_their_own_repeats(tmp_path):
    settings = ProfileSettings(points=10, repeats=2, holdout_repeats=5, warmup=0, samples=6, clock="outcome",
                               remeasure_rounds=0)
    profile = profile_backend(FakeBackend(), settings, progress=False)
    runs = {bool(r["holdout"]): len(r["latency_runs_ms"].split(";")) for r in profile.rows}
    assert runs == {True: 5, False: 2}
    with pytest.raises(ValueError, match="holdout_repeats=0 is invalid"):
        ProfileSettings(holdout_repeats=0)


@pytest.mark.parametrize("cpu_time", [False, True])
def test_run_timer_returns_the_result_and_positive_ms(cpu_time):
    def busy(n):
        return sum(i * i for i in range(n))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPU time with several torch threads warns; not what is tested here
        timer = RunTimer("cpu", cpu_time=cpu_time)
    ms, result = timer.time(busy, 20_000)
    assert result == busy(20_000) and ms > 0


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="points=1 is invalid"):
        ProfileSettings(points=1)
    with pytest.raises(ValueError, match="clock='gpu' is invalid"):
        ProfileSettings(clock="gpu")
    with pytest.raises(ValueError, match="holdout_fraction=0.7 is invalid"):
        ProfileSettings(holdout_fraction=0.7)


# --- estimator -----------------------------------------------------------------------------
def test_predict_is_vectorised(fitted):
    configs = list(SPACE.grid(token_budgets=True))
    counts = [_counts(vision=SPACE.vision_tokens(c), new=1 + i % 3) for i, c in enumerate(configs)]
    ms = fitted.predict(configs, counts)
    assert ms.shape == (len(configs),) and ms.dtype == np.float64 and (ms > 0).all()
    array_counts = np.array([[c.prompt_tokens, c.vision_tokens_full, c.vision_tokens, c.new_tokens] for c in counts])
    np.testing.assert_array_equal(fitted.predict(configs, array_counts), ms)
    assert fitted.predict([], []).shape == (0,)
    assert fitted.predict(configs[0], counts[0]).shape == (1,)
    # A row's prediction is bit-identical alone and in any batch (group rewards == episode rewards).
    alone = np.array([fitted.predict([c], [n])[0] for c, n in zip(configs, counts)])
    np.testing.assert_array_equal(alone, ms)
    assert fitted.predict_stage1([c.tier for c in configs[:4]], counts[:4]).shape == (4,)


def test_estimator_recovers_a_known_latency_function(fitted):
    backend = FakeBackend()
    configs = list(SPACE.grid(token_budgets=True))
    samples = backend.samples("validation")
    counts = [backend._counts(samples[i % 60], c) for i, c in enumerate(configs)]
    truth = np.array([backend.true_ms(SPACE.resolve(c), n)[0] for c, n in zip(configs, counts)])
    assert accuracy(fitted.predict(configs, counts), truth).within_10 >= 0.95


def test_save_load_round_trip_keeps_fingerprint(fitted, tmp_path):
    path = fitted.save(tmp_path / "est.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = LatencyEstimator.load(path, expect_fingerprint=fitted.fingerprint, expect_identity=fitted.identity)
    assert loaded.fingerprint == fitted.fingerprint == {**device_fingerprint(), "speed_probe": fitted.fingerprint["speed_probe"]}
    assert loaded.identity == FakeBackend().identity() and loaded.package_version == fitted.package_version
    configs = [KnobConfig(tier="low", top_k=2, depth=3), KnobConfig()]
    counts = [_counts(vision=1), _counts()]
    np.testing.assert_array_equal(loaded.predict(configs, counts), fitted.predict(configs, counts))
    assert not list(tmp_path.glob(".*tmp")), "atomic write left a temporary file"


@pytest.mark.parametrize("change,expected", [
    ({"fingerprint": {"gpu": "NVIDIA H100"}}, "device gpu None != 'NVIDIA H100'"),
    ({"fingerprint": {"cpu": "Other CPU"}}, "device cpu"),
    ({"identity": {"model": "other-model"}}, "backend model 'fake-vlm' != 'other-model'"),
])
def test_loading_for_another_device_or_backend_warns(fitted, tmp_path, change, expected):
    path = fitted.save(tmp_path / "est.bin")
    fingerprint = {**fitted.fingerprint, **change.get("fingerprint", {})}
    identity = {**fitted.identity, **change.get("identity", {})}
    with pytest.warns(EstimatorMismatchWarning, match=expected):
        LatencyEstimator.load(path, expect_fingerprint=fingerprint, expect_identity=identity)


@pytest.mark.parametrize("damage,message", [
    (lambda data: data[: len(data) // 2], "not JSON"),
    (lambda data: data.replace(b'"method": "', b'"method": "x', 1), "checksum mismatch"),
    (lambda data: data[:30], "not JSON"),
    (lambda data: b"", "not JSON"),
    (lambda data: b"not an estimator at all", "not JSON"),
    (lambda data: b'{"payload": 1, "sha256": "' + hashlib.sha256(b"1").hexdigest().encode() + b'"}',
     "latency estimator format"),
])
def test_damaged_files_give_an_error_naming_the_file(fitted, tmp_path, damage, message):
    path = fitted.save(tmp_path / "damaged.estimator")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(EstimatorFileError, match=message) as info:
        LatencyEstimator.load(path)
    assert str(path) in str(info.value)


def test_estimator_file_is_data_only_json(fitted, tmp_path):
    path = fitted.save(tmp_path / "e.estimator")
    payload = json.loads(path.read_text())["payload"]
    assert payload["format"] == "knobgym-latency-estimator/2"
    assert payload["profile_sha256"] == fitted.profile_sha256 and payload["profile_rows"] == fitted.profile_rows
    assert payload["total"]["kind"] == fitted.method


def test_boosted_trees_reproduce_scikit_learn(fake_profile):
    from sklearn.ensemble import GradientBoostingRegressor

    from latency_model.estimator import BoostedTrees

    profile = fake_profile[0]
    X = CostFeatures(SPACE, COST_PARAMS).compute(profile.configs(), profile.token_counts())
    y = np.log(profile.column("latency_ms").astype(float))
    model = GradientBoostingRegressor(loss="huber", n_estimators=30, max_depth=3, random_state=0).fit(X, y)
    trees = BoostedTrees.from_sklearn(model)
    np.testing.assert_allclose(trees.predict(X), model.predict(X), rtol=1e-12, atol=1e-12)
    again = BoostedTrees.from_dict(json.loads(json.dumps(trees.to_dict())))
    np.testing.assert_array_equal(again.predict(X), trees.predict(X))


def test_missing_file_names_it(tmp_path):
    with pytest.raises(EstimatorFileError, match="missing.estimator"):
        LatencyEstimator.load(tmp_path / "missing.estimator")


# --- cache ---------------------------------------------------------------------------------
def test_cache_profiles_once_then_hits(tmp_path):
    backend = FakeBackend()
    first = get_estimator(backend, tmp_path, settings=FAST, progress=False)
    runs = backend.runs
    assert runs > 0
    estimator_path, profile_path = cache_paths(backend, tmp_path)
    assert estimator_path.exists() and profile_path.exists()
    second = get_estimator(ExplodingBackend(), tmp_path, settings=FAST)
    assert second.identity == first.identity and backend.runs == runs
    configs, counts = [KnobConfig()], [_counts()]
    np.testing.assert_array_equal(second.predict(configs, counts), first.predict(configs, counts))


def test_cache_dir_from_environment_and_no_profiling_when_told(tmp_path, monkeypatch):
    monkeypatch.setenv("KNOBGYM_CACHE", str(tmp_path / "env-cache"))
    estimator_path, _ = cache_paths(FakeBackend())
    assert estimator_path.parent == tmp_path / "env-cache" / "latency"
    with pytest.raises(FileNotFoundError, match="no valid latency estimator cached"):
        get_estimator(ExplodingBackend(), profile_if_missing=False)
    other = cache_paths(FakeBackend(name="other"))[0]
    assert other != estimator_path and other.name.startswith("other-")


# --- report and CLI --------------------------------------------------------------------------
def test_accuracy_metrics_by_hand():
    acc = accuracy(np.array([100.0, 104.0, 109.0, 130.0]), np.array([100.0, 100.0, 100.0, 100.0]))
    assert acc.within_5 == 0.5 and acc.within_10 == 0.75 and acc.mape == pytest.approx((0 + 4 + 9 + 30) / 4)


def test_held_out_report_beats_flops_only(fake_profile):
    report = held_out_report(fake_profile[0])
    assert set(report.total) == {"analytic_gbt", "gbt", "analytic", "flops_linear"}
    ours, baseline = report.total["analytic_gbt"], report.total["flops_linear"]
    assert ours.within_10 >= 0.9 and ours.mape < baseline.mape
    assert report.holdout_rows == int(fake_profile[0].holdout.sum()) and report.stage1
    assert "flops_linear" in report.format()


def test_cli_report_and_fit_from_csv(fake_profile, tmp_path, capsys):
    _, path = fake_profile
    assert cli_main(["report", f"csv={path}"]) == 0
    out = capsys.readouterr().out
    assert "flops_linear" in out and "beats the FLOPs-only fit" in out
    assert cli_main(["fit", f"csv={path}", f"out={tmp_path / 'e.estimator'}", "method=gbt"]) == 0
    assert LatencyEstimator.load(tmp_path / "e.estimator").method == "gbt"


def test_cli_overrides_are_validated():
    options, backend_options = parse_overrides(["backend=tiny", "points=10", "backend.device=cpu", "force=true"])
    assert options["points"] == 10 and options["force"] is True and backend_options == {"device": "cpu"}
    with pytest.raises(ValueError, match="unknown override 'pionts'"):
        parse_overrides(["pionts=3"])
    with pytest.raises(ValueError, match="method='xgb' is invalid"):
        parse_overrides(["method=xgb"])
    with pytest.raises(ValueError, match="command 'train' is invalid; accepted: profile, fit, report"):
        cli_main(["train"])
    with pytest.raises(ValueError, match="force='yes' is invalid"):
        parse_overrides(["force=yes"])


# --- files: checksums and row counts (issue 13) ----------------------------------------------------
def _write_copy(path, tmp_path, transform, name="copy.csv"):
    target = tmp_path / name
    target.write_bytes(transform(path.read_bytes()))
    return target


def test_profile_cut_at_a_row_boundary_is_an_error_naming_the_file(fake_profile, tmp_path):
    _, path = fake_profile
    lines = path.read_bytes().splitlines(keepends=True)
    for cut in (lines[:-1], lines[:-6], lines[:-7] + lines[-1:]):  # checksum line gone; rows gone; rows gone, trailer kept
        target = _write_copy(path, tmp_path, lambda data: b"".join(cut))
        with pytest.raises(CorruptFileError, match="cut short|checksum mismatch") as info:
            read_profile(target)
        assert str(target) in str(info.value)


def test_hand_edited_profile_is_an_error(fake_profile, tmp_path):
    _, path = fake_profile
    text = path.read_text()
    row = text.splitlines()[10]
    edited = _write_copy(path, tmp_path, lambda data: text.replace(row, row.replace(",0,", ",1,", 1)).encode())
    with pytest.raises(CorruptFileError, match="checksum mismatch"):
        read_profile(edited)


def test_profile_row_count_and_finite_rows_are_checked(fake_profile, tmp_path):
    from backends.io import sha256_bytes

    _, path = fake_profile
    body = path.read_bytes().rsplit(b"# sha256: ", 1)[0]
    rows = len(read_profile(path))

    def resigned(new_body: bytes):
        return _write_copy(path, tmp_path, lambda data: new_body + f"# sha256: {sha256_bytes(new_body)}\n".encode())

    with pytest.raises(CorruptFileError, match=f"holds {rows} rows but its header says {rows + 1}"):
        read_profile(resigned(body.replace(f"# rows: {rows}".encode(), f"# rows: {rows + 1}".encode())))
    lines = body.decode().splitlines(keepends=True)
    header = next(i for i, line in enumerate(lines) if line.startswith("point,"))
    cells = lines[header + 1].split(",")
    cells[CSV_COLUMNS.index("latency_ms")] = "nan"
    lines[header + 1] = ",".join(cells)
    with pytest.raises(CorruptFileError, match=f"line {header + 2}: latencies must be finite"):
        read_profile(resigned("".join(lines).encode()))


# --- noise (issue 13) --------------------------------------------------------------------------
class NoisyFirstBackend(FakeBackend):
    """Very noisy for its first ``noisy_runs`` runs (another job running), then quiet."""

    def __init__(self, noisy_runs: int, scale: float = 3.0, **kwargs):
        super().__init__(**kwargs)
        self.noisy_runs, self.scale = noisy_runs, scale

    def run(self, sample, knobs):
        outcome = super().run(sample, knobs)
        if self.runs <= self.noisy_runs:
            outcome.measured_ms *= 1.0 + self.scale * self.rng.random()
        return outcome


SMALL = ProfileSettings(points=40, repeats=3, warmup=0, samples=12, clock="outcome")


def test_profile_records_noise_and_estimator_carries_it(fake_profile, fitted):
    profile, _ = fake_profile
    noise = profile.noise
    assert noise.bound_pct == FAST.max_noise_pct and noise.points == len(profile) and not noise.exceeds
    assert 0 < noise.spread_pct < 10  # the fake's jitter is 1%
    assert fitted.noise == noise and fitted.noise_pct == noise.spread_pct
    assert fitted.profile_sha256 == profile.sha256 and fitted.profile_rows == len(profile)
    assert "repeat noise" in noise.describe()


def test_noisy_points_are_measured_again_and_then_cached(tmp_path, capsys):
    backend = NoisyFirstBackend(noisy_runs=SMALL.points * SMALL.repeats)  # the whole first pass is noisy
    estimator = get_estimator(backend, tmp_path, settings=SMALL, progress=True)
    assert "taking the profile again as a whole" in capsys.readouterr().err
    assert estimator.noise.remeasured_points == SMALL.points and estimator.noise.rounds == 1
    assert not estimator.noise.exceeds and "the quietest of 2 takes" in estimator.noise.describe()
    assert all(p.exists() for p in cache_paths(backend, tmp_path))


def test_noisy_profile_is_not_cached(tmp_path):
    backend = NoisyFirstBackend(noisy_runs=10**9, scale=20.0)  # noisy all along
    settings = ProfileSettings(points=40, repeats=3, warmup=0, samples=12, clock="outcome", remeasure_rounds=1)
    with pytest.warns(NoisyProfileWarning, match="too noisy to cache.*force=true"):
        estimator = get_estimator(backend, tmp_path, settings=settings, progress=False)
    assert estimator.noise.exceeds and estimator.noise.spread_pct > settings.max_noise_pct
    assert estimator.noise.rounds == 1  # re-measured a bounded number of times
    assert not any(p.exists() for p in cache_paths(backend, tmp_path))
    # The rest of the process reuses it (a command building several envs profiles once), uncached still.
    runs = backend.runs
    assert get_estimator(backend, tmp_path, settings=settings, progress=False) is estimator
    assert backend.runs == runs and not any(p.exists() for p in cache_paths(backend, tmp_path))
    # Accepting more noise explicitly caches it.
    relaxed = ProfileSettings(**{**settings.__dict__, "max_noise_pct": 10_000.0})
    assert not get_estimator(backend, tmp_path, settings=relaxed, progress=False).noise.exceeds
    assert all(p.exists() for p in cache_paths(backend, tmp_path))


# --- cache validity and refits (issues 13 and 20) --------------------------------------------------
def test_refit_after_re_profile(tmp_path, capsys):
    backend = FakeBackend()
    first = get_estimator(backend, tmp_path, settings=SMALL, progress=False)
    estimator_path, profile_path = cache_paths(backend, tmp_path)
    # Re-profile behind the estimator's back (as `profile csv=<cache csv>` would): other latencies.
    profile_backend(FakeBackend(seed=5, jitter=0.05), SMALL, profile_path, progress=False)
    second = get_estimator(ExplodingBackend(), tmp_path)
    assert "fitted on another profile" in capsys.readouterr().err
    assert second.profile_sha256 == read_profile(profile_path).sha256 != first.profile_sha256
    assert LatencyEstimator.load(estimator_path).profile_sha256 == second.profile_sha256  # the refit was cached


def test_force_profiles_again_and_refits(tmp_path):
    backend = FakeBackend()
    first = get_estimator(backend, tmp_path, settings=SMALL, progress=False)
    runs = backend.runs
    again = get_estimator(backend, tmp_path, settings=SMALL, progress=False, force=True)
    assert backend.runs > runs and again.profile_sha256 != first.profile_sha256
    assert get_estimator(ExplodingBackend(), tmp_path).profile_sha256 == again.profile_sha256


def test_corrupt_cache_entries_are_refitted_or_profiled_again(tmp_path, capsys):
    backend = FakeBackend()
    get_estimator(backend, tmp_path, settings=SMALL, progress=False)
    estimator_path, profile_path = cache_paths(backend, tmp_path)
    estimator_path.write_bytes(estimator_path.read_bytes()[:100])
    refit = get_estimator(ExplodingBackend(), tmp_path)  # refits on the valid profile: no profiling
    assert "ignoring the cached latency estimator" in capsys.readouterr().err
    assert refit.profile_sha256 == read_profile(profile_path).sha256
    profile_path.write_bytes(profile_path.read_bytes()[:-200])
    runs = backend.runs
    get_estimator(backend, tmp_path, settings=SMALL, progress=False)
    assert "ignoring the cached latency profile" in capsys.readouterr().err and backend.runs > runs


class ClonedBackend(FakeBackend):
    """The same checkpoint as seen from another checkout: another path, the same content revision."""

    def __init__(self, checkout: str, revision: str = "sha-abc", **kwargs):
        super().__init__(**kwargs)
        self.checkout, self.revision = checkout, revision

    def identity(self) -> dict:
        return {"backend": "fake", "model": f"{self.checkout}/backends/tiny/checkpoint", "precision": "fp32",
                "content_revision": self.revision}


def test_cache_key_is_the_content_revision_not_the_checkout_path(tmp_path):
    a, b = ClonedBackend("/home/me/clone-a"), ClonedBackend("/srv/clone-b")
    assert cache_paths(a, tmp_path) == cache_paths(b, tmp_path)
    assert cache_paths(ClonedBackend("/home/me/clone-a", revision="sha-def"), tmp_path) != cache_paths(a, tmp_path)
    assert identity_key(a.identity()) == {"backend": "fake", "precision": "fp32", "content_revision": "sha-abc"}
    get_estimator(a, tmp_path, settings=SMALL, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "fitted elsewhere" warning for the other clone
        loaded = LatencyEstimator.load(cache_paths(b, tmp_path)[0], expect_identity=b.identity())
    assert loaded.identity["model"].startswith("/home/me/clone-a")
    # Without a content revision, absolute paths still stay out of the key.
    assert "model" not in identity_key({"backend": "tiny", "model": "/abs/checkpoint", "revision": "local-1"})
    assert identity_key({"backend": "hf", "model": "org/name", "revision": "main"})["model"] == "org/name"


# --- selection rule (issue 20) -------------------------------------------------------------------
def test_starred_method_is_the_one_the_stated_rule_chooses(fake_profile):
    profile, _ = fake_profile
    report = held_out_report(profile)
    validation = report.selection["validation_mape_pct"]
    assert set(validation) == set(METHODS)
    candidates = {m: validation[m] for m in ("analytic_gbt", "gbt", "analytic")}  # flops_linear: the baseline
    assert report.chosen == min(candidates, key=candidates.get)
    text = report.format()
    starred = [line for line in text.splitlines() if line.startswith("* ") and "MAPE" not in line]
    assert starred[0].split()[1] == report.chosen
    assert SELECTION_RULE in text
    # The cached estimator follows the same rule on the same rows.
    estimator = fit_estimator(profile)
    assert estimator.method == report.chosen and estimator.selection["rule"] == SELECTION_RULE
    assert fit_estimator(profile, "flops_linear").selection["rule"] == "given"


# --- command line (issues 13 and 20) -------------------------------------------------------------
def test_help_lists_commands_and_options(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("profile", "fit", "report", "force=true", "max_noise_pct", "estimator=PATH", "method="):
        assert word in out, word
    done = subprocess.run([sys.executable, "-m", "latency_model", "--help"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and "force=true" in done.stdout and "invalid" not in done.stderr


@pytest.fixture
def fake_cli_backend(monkeypatch, tmp_path):
    """``backend=hlat-fake`` for the CLI, with a cache of its own."""
    from backends import registry

    monkeypatch.setitem(registry._FACTORIES, "hlat-fake", lambda **_: FakeBackend())
    monkeypatch.setattr(registry, "_LOADED", {})
    monkeypatch.setenv("KNOBGYM_CACHE", str(tmp_path / "cache"))
    return ["backend=hlat-fake", "clock=outcome", "points=40", "repeats=3", "warmup=0", "samples=12"]


def test_cli_profile_force_refits_and_report_validates(fake_cli_backend, capsys):
    args = fake_cli_backend
    assert cli_main(["fit", *args]) == 0
    estimator_path, profile_path = cache_paths(FakeBackend())
    first = LatencyEstimator.load(estimator_path).profile_sha256
    assert cli_main(["profile", *args, "force=true"]) == 0
    out = capsys.readouterr().out
    assert "refitted the estimator" in out and "repeat noise" in out
    assert LatencyEstimator.load(estimator_path).profile_sha256 == read_profile(profile_path).sha256 != first
    assert cli_main(["report", *args]) == 0
    assert "estimator: valid" in capsys.readouterr().out
    # A corrupt estimator is an error naming it, not "all is well".
    estimator_path.write_bytes(estimator_path.read_bytes()[:-50])
    with pytest.raises(EstimatorFileError, match="fit backend=hlat-fake force=true") as info:
        cli_main(["report", *args])
    assert str(estimator_path) in str(info.value)


def test_cli_report_on_a_stale_or_corrupt_estimator_file(fake_profile, tmp_path, capsys):
    _, path = fake_profile
    other = tmp_path / "other.csv"
    profile_backend(FakeBackend(seed=3), SMALL, other, progress=False)
    stale = fit_estimator(read_profile(other)).save(tmp_path / "stale.estimator")
    assert cli_main(["report", f"csv={path}", f"estimator={stale}"]) == 1
    assert "STALE" in capsys.readouterr().out
    good = fit_estimator(read_profile(path)).save(tmp_path / "good.estimator")
    assert cli_main(["report", f"csv={path}", f"estimator={good}"]) == 0
    good.write_text(good.read_text().replace('"method"', '"methodd"', 1))
    with pytest.raises(EstimatorFileError, match="checksum mismatch"):
        cli_main(["report", f"csv={path}", f"estimator={good}"])


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("# format: nothing\n")
    done = subprocess.run([sys.executable, "-m", "latency_model", "report", f"csv={bad}"], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and str(bad) in done.stderr


# --- progress (issue 20) -------------------------------------------------------------------------
def test_progress_is_plain_lines_when_not_a_terminal():
    import io

    from backends.progress import LineProgress, progress

    stream = io.StringIO()
    clock = iter(range(0, 1000, 10)).__next__  # 10 s per call
    bar = LineProgress(total=12, desc="profiling latency", unit="run", stream=stream, interval_s=25, clock=clock)
    for _ in range(12):
        bar.update()
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "profiling latency: 0/12 runs" and lines[-1].endswith("- done")
    assert 3 <= len(lines) <= 6  # periodic, not one per update
    assert "12/12 runs (100%)" in lines[-1]
    assert isinstance(progress(5, "x", stream=io.StringIO()), LineProgress)
    silent = io.StringIO()
    with progress(5, "x", stream=silent, enabled=False) as off:
        off.update()
    assert silent.getvalue() == ""


def test_fake_backends_implement_the_whole_protocol():
    assert isinstance(FakeBackend(), Backend) and isinstance(ClonedBackend("/x"), Backend)
