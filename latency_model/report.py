"""Held-out accuracy of the estimator methods on a profile.

Fitting uses only the rows whose configuration *and* sample were not held out by the profile
design; scoring uses the held-out rows (unseen configurations on unseen inputs). Metrics per
method: MAPE, share of predictions within +-5% and +-10% of the measured median, and Spearman
rank correlation; the FLOPs-only linear fit is always among the methods.

The starred method is the one :func:`~latency_model.estimator.select_method` chooses (its rule
is printed with the table): lowest error on a validation fold carved from the fitting rows, so
the choice never sees the held-out rows it is scored on; the cached estimator uses the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from latency_model.estimator import METHODS, fit_regressors, select_method
from latency_model.profile import ProfileData, parse_runs, spreads_of


@dataclass(frozen=True)
class Accuracy:
    """Accuracy of predictions against measured latencies."""

    mape: float  # mean absolute percentage error, in %
    within_5: float  # share of predictions within +-5% of the measurement
    within_10: float  # share within +-10%
    spearman: float  # rank correlation
    n: int

    def as_dict(self) -> dict:
        return {"mape_pct": self.mape, "within_5pct": self.within_5, "within_10pct": self.within_10,
                "spearman": self.spearman, "n": self.n}


def accuracy(predicted: np.ndarray, measured: np.ndarray) -> Accuracy:
    """:class:`Accuracy` of ``predicted`` against ``measured`` (both ms, same length, measured > 0)."""
    predicted, measured = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
    if predicted.shape != measured.shape or measured.ndim != 1 or len(measured) == 0:
        raise ValueError(f"predicted {predicted.shape} and measured {measured.shape} must be equal-length, "
                         f"non-empty 1-D arrays")
    if not (measured > 0).all():
        raise ValueError("measured latencies must be > 0")
    rel = np.abs(predicted - measured) / measured
    defined = len(measured) > 1 and np.ptp(predicted) > 0 and np.ptp(measured) > 0
    from scipy.stats import spearmanr  # here, not at import: an env reading its estimator needs no scipy

    rho = spearmanr(predicted, measured).statistic if defined else float("nan")
    return Accuracy(mape=float(100 * rel.mean()), within_5=float((rel <= 0.05).mean()),
                    within_10=float((rel <= 0.10).mean()), spearman=float(rho), n=len(measured))


def repeat_spread(profile: ProfileData, mask: np.ndarray) -> float:
    """Median over points of (slowest - fastest run) / median run: how noisy the measurements are."""
    spreads = spreads_of(parse_runs(r["latency_runs_ms"]) for r, keep in zip(profile.rows, mask) if keep)
    return float(np.median(spreads)) if spreads else float("nan")


@dataclass
class HeldOutReport:
    """Per-method held-out accuracy of a profile, whole runs and stage 1."""

    total: dict  # method -> Accuracy
    stage1: dict  # method -> Accuracy (empty without stage-1 times)
    fit_rows: int
    holdout_rows: int
    holdout_configs: int
    holdout_samples: int
    noise: float  # repeat_spread of the held-out rows
    device: dict
    backend: dict
    clock: str = "wall"
    selection: dict | None = None  # select_method's result: rule, chosen, validation MAPE per method

    def as_dict(self) -> dict:
        return {"total": {m: a.as_dict() for m, a in self.total.items()},
                "stage1": {m: a.as_dict() for m, a in self.stage1.items()},
                "fit_rows": self.fit_rows, "holdout_rows": self.holdout_rows,
                "holdout_configs": self.holdout_configs, "holdout_samples": self.holdout_samples,
                "repeat_spread": self.noise, "clock": self.clock, "device": self.device, "backend": self.backend,
                "selection": self.selection}

    @property
    def chosen(self) -> str:
        """The method the selection rule chose (``analytic_gbt`` when no selection was made)."""
        return (self.selection or {}).get("chosen", "analytic_gbt")

    def format(self, chosen: str | None = None) -> str:
        """A plain-text table, the chosen method starred (default: the selection rule's), the rule
        stated and the FLOPs-only baseline beside it."""
        chosen = chosen or self.chosen
        validation = (self.selection or {}).get("validation_mape_pct", {})
        lines = [f"device: {self.device.get('gpu') or self.device.get('cpu')} ({self.device.get('torch_threads')} "
                 f"torch threads, torch {self.device.get('torch')}, transformers {self.device.get('transformers')})",
                 f"backend: {self.backend}",
                 f"fit on {self.fit_rows} rows; held out {self.holdout_rows} rows = {self.holdout_configs} unseen "
                 f"configurations x {self.holdout_samples} unseen samples",
                 f"clock: {self.clock}; measurement noise, median over held-out points of (slowest - fastest "
                 f"repeat) / median: {100 * self.noise:.1f}%"]
        for title, table in (("whole run", self.total), ("stage 1", self.stage1)):
            if not table:
                continue
            with_val = title == "whole run" and bool(validation)
            head = f"  {'method':<20}" + ("  val MAPE%" if with_val else "") + "   MAPE%  within5%  within10%  spearman"
            lines += ["", f"{title}:", head, "-" * len(head)]
            for method, acc in table.items():
                mark = "*" if method == chosen else " "
                val = (f"  {validation[method]:9.2f}" if method in validation else " " * 11) if with_val else ""
                lines.append(f"{mark} {method:<20}{val}  {acc.mape:6.2f}  {100 * acc.within_5:8.1f}  "
                             f"{100 * acc.within_10:9.1f}  {acc.spearman:8.3f}")
        if self.selection and chosen == self.selection.get("chosen"):
            lines += ["", f"* chosen by the rule: {self.selection['rule']} ({self.selection.get('validation_rows')} "
                          f"validation rows); MAPE% is on the held-out rows, which the choice never saw"]
        else:
            lines += ["", f"* {chosen}: given with method="]
        if chosen in self.total and "flops_linear" in self.total:
            ours, base = self.total[chosen], self.total["flops_linear"]
            verdict = "beats" if ours.mape < base.mape else "does NOT beat"
            lines += [f"* {chosen} {verdict} the FLOPs-only fit on held-out MAPE ({ours.mape:.2f}% vs "
                      f"{base.mape:.2f}%); within +-10%: {100 * ours.within_10:.1f}%"]
        return "\n".join(lines)


def held_out_report(profile: ProfileData, methods=METHODS, seed: int = 0) -> HeldOutReport:
    """Fit every method on the non-held-out rows of ``profile`` and score it on the held-out rows."""
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"method={m!r} is invalid; accepted: {', '.join(METHODS)}")
    holdout = profile.holdout
    if holdout.all() or not holdout.any():
        raise ValueError(f"profile has {int(holdout.sum())} held-out rows of {len(holdout)}; accepted: some rows "
                         f"held out and some not (profile with holdout_fraction > 0)")
    fit_mask = ~holdout
    selection = select_method(profile, fit_mask, tuple(methods), seed)
    measured = profile.column("latency_ms", holdout).astype(np.float64)
    measured_stage1 = profile.column("stage1_ms", holdout).astype(np.float64)
    configs, counts = profile.configs(holdout), profile.token_counts(holdout)
    total, stage1 = {}, {}
    for method in methods:
        features, model, model1 = fit_regressors(profile, fit_mask, method, seed)
        total[method] = accuracy(model.predict(features.compute(configs, counts)), measured)
        if model1 is not None and (measured_stage1 > 0).all():
            predicted1 = model1.predict(features.compute_stage1([c.tier for c in configs], counts))
            stage1[method] = accuracy(predicted1, measured_stage1)
    held_configs = {(c.tier, c.token_budget, c.top_k, c.depth) for c in configs}
    return HeldOutReport(total=total, stage1=stage1, fit_rows=int(fit_mask.sum()), holdout_rows=int(holdout.sum()),
                         holdout_configs=len(held_configs),
                         holdout_samples=len(set(profile.column("sample_id", holdout).tolist())),
                         noise=repeat_spread(profile, holdout), device=profile.device, backend=profile.backend,
                         clock=str(profile.settings.get("clock", "wall")), selection=selection)
