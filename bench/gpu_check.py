"""GPU check: the full-size architectures on one CUDA GPU, in bf16 and bitsandbytes nf4 / int8.

    python -m bench.gpu_check [--models llava-1.5-7b,idefics2-8b,olmoe-1b-7b,pythia-2.8b,qwen3-vl-2b,
                                        qwen3-vl-30b-a3b-nf4]
                              [--quantizations bf16,nf4,int8] [--out runs/gpu_check/<time>]
                              [--profile-points 24] [--profile-repeats 3] [--work-dir DIR]

One prepared command, sized for at most 8 minutes on one H100/H200-class GPU. For each model (one
at a time, checkpoint deleted after it) and each precision:

- builds the random-weight checkpoint at the published size exactly as ``bench.full_size`` does,
  loads it on ``cuda`` through the same loading function, and runs the same knob checks at the
  real shapes (vision tokens and encoder patches per tier, blocks per depth, experts per token,
  non-empty generation), timed with CUDA synchronisation;
- a model written pre-quantized (``qwen3-vl-30b-a3b-nf4``: nf4, as many of its 48 blocks as
  ``bench.full_size`` builds under its host-memory cap) runs in its own quantization only;
- LLaVA-1.5-7B under nf4: one ``MultiKnob-v0`` episode per vision tier (the other knobs at their
  highest), and ``TokenBudget-v0`` at both ends of its action space;
- LLaVA-1.5-7B nf4 and OLMoE-1B-7B bf16: a latency profile of the knob grid
  (``latency_model.profile_backend``: batch 1, CUDA-synchronised, warm-up runs excluded) written as
  CSV, the estimator fitted on it (``fit_estimator``) and its held-out accuracy
  (``held_out_report``) written as JSON;
- peak GPU memory: ``torch.cuda.max_memory_allocated`` per load, and the largest
  ``nvidia-smi --query-gpu=memory.used`` seen while it ran (sampled every 0.2 s) when
  ``nvidia-smi`` is present.

Results go to ``--out`` (``results.json``, ``table.md``, the profiles and reports) and the table is
printed. Without CUDA it validates its configuration (models, precisions, profile settings, output
folder, bitsandbytes installed), prints the plan with each model's parameter count, and exits 3 with
one line saying that a CUDA GPU is needed; bad options exit 2 with one line.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Sequence

import torch

from bench import full_size as fs

QUANTIZATIONS = ("bf16", "nf4", "int8")
GPU_MODELS = (*fs.DEFAULT_MODELS, "qwen3-vl-2b", "qwen3-vl-30b-a3b-nf4")
PROFILED = (("llava-1.5-7b", "nf4"), ("olmoe-1b-7b", "bf16"))
TIER_EPISODES = ("llava-1.5-7b", "nf4")
NEEDS_CUDA_EXIT = 3


class GpuCheckError(ValueError):
    """A bad option: one line, exit 2."""


class NeedsCuda(RuntimeError):
    """No CUDA device: one line, exit 3."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = fs.OneLineParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(GPU_MODELS), help=f"comma-separated subset of {', '.join(fs.MODELS)}")
    parser.add_argument("--quantizations", default=",".join(QUANTIZATIONS),
                        help=f"comma-separated subset of {', '.join(QUANTIZATIONS)}")
    parser.add_argument("--out", default=None, help="results folder (default runs/gpu_check/<UTC time>); must not exist")
    parser.add_argument("--profile-points", type=int, default=24, help="knob-grid points per latency profile")
    parser.add_argument("--profile-repeats", type=int, default=3, help="timed runs per profile point")
    parser.add_argument("--work-dir", default=None, help="where checkpoints are written (default: a temporary dir)")
    parser.add_argument("--max-new-tokens", type=int, default=4, help="tokens generated per run (1..8)")
    return parser.parse_args(argv)


def validate(args: argparse.Namespace) -> argparse.Namespace:
    """Check every option before anything runs; a :class:`GpuCheckError` names the bad value."""
    from latency_model import ProfileSettings

    try:
        args.model_list = fs.parse_models(args.models)
    except fs.FullSizeError as error:
        raise GpuCheckError(str(error)) from None
    quants = [q.strip() for q in args.quantizations.split(",") if q.strip()]
    bad = [q for q in quants if q not in QUANTIZATIONS]
    if not quants or bad:
        raise GpuCheckError(f"--quantizations={args.quantizations!r} is invalid; accepted: a comma-separated subset "
                            f"of {', '.join(QUANTIZATIONS)}")
    args.quant_list = list(dict.fromkeys(quants))
    try:
        args.profile_settings = ProfileSettings(points=args.profile_points, repeats=args.profile_repeats, warmup=3,
                                                samples=4, holdout_fraction=0.25)
    except ValueError as error:
        raise GpuCheckError(f"profile option: {error}") from None
    if not (1 <= args.max_new_tokens <= 8):
        raise GpuCheckError(f"--max-new-tokens={args.max_new_tokens!r} is invalid; accepted: 1..8")
    out = Path(args.out) if args.out else Path("runs/gpu_check") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    if out.exists():
        raise GpuCheckError(f"--out={str(out)!r} already exists; accepted: a folder that does not exist yet")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not _writable(parent):
        raise GpuCheckError(f"--out={str(out)!r} cannot be created (nearest existing parent {str(parent)!r} is not a "
                            f"writable folder); accepted: a new folder under a writable one")
    args.out_dir = out
    if any(q != "bf16" for q in args.quant_list) and importlib.util.find_spec("bitsandbytes") is None:
        raise GpuCheckError(f"--quantizations={args.quantizations!r} needs bitsandbytes, which is not installed; "
                            f"accepted: pip install bitsandbytes, or --quantizations=bf16")
    return args


def _writable(folder: Path) -> bool:
    import os

    return os.access(folder, os.W_OK | os.X_OK)


def quantizations_of(arch: fs.Architecture, asked: list[str]) -> list[str]:
    """A checkpoint written pre-quantized runs in its own quantization only; others in every one asked."""
    return [arch.quantization] if arch.quantization else asked


def plan(args: argparse.Namespace) -> list[str]:
    """What the check will run, with each model's parameter count (from the meta-device build)."""
    lines = []
    for name in args.model_list:
        arch = fs.load_architecture(name)
        params = fs.count_parameters(fs.meta_model(arch))
        quants = quantizations_of(arch, args.quant_list)
        extras = []
        if (name, "nf4") == TIER_EPISODES and "nf4" in quants:
            extras.append("MultiKnob-v0 episode per tier, TokenBudget-v0 extremes")
        extras += [f"latency profile ({q}, {args.profile_points} points x {args.profile_repeats} repeats)"
                   for q in quants if (name, q) in PROFILED]
        if arch.max_peak_gb:
            extras.append(f"decoder blocks capped by {arch.max_peak_gb:g} GB of host memory")
        lines.append(f"{name}: {params / 1e9:.2f} B parameters; {', '.join(quants)}"
                     + (f"; {'; '.join(extras)}" if extras else ""))
    return lines


def require_cuda() -> torch.device:
    """The first CUDA call: everything before it runs on any machine."""
    if not torch.cuda.is_available():
        raise NeedsCuda(f"bench.gpu_check needs CUDA: no CUDA device is available here (torch {torch.__version__}, "
                        f"CUDA build {torch.version.cuda or 'none'}); run it on a machine with an NVIDIA GPU")
    return torch.device("cuda")


class GpuMemoryMonitor:
    """Largest ``nvidia-smi`` memory.used (MiB) seen while running, sampled every 0.2 s."""

    def __init__(self):
        self.command = shutil.which("nvidia-smi")
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run([self.command, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                used = max(float(v) for v in out.split())
                self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> "GpuMemoryMonitor":
        if self.command:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.command:
            self._thread.join(timeout=10)


def _profile(backend, name: str, quant: str, args, out_dir: Path) -> dict:
    from latency_model import fit_estimator, held_out_report, profile_backend

    stem = f"profile-{name}-{quant}"
    start = time.perf_counter()
    data = profile_backend(backend, args.profile_settings, path=out_dir / f"{stem}.csv", progress=False)
    estimator = fit_estimator(data, source=f"{stem}.csv")
    estimator.save(out_dir / f"estimator-{name}-{quant}.bin")
    report = held_out_report(data)
    (out_dir / f"{stem}-report.json").write_text(json.dumps(report.as_dict(), indent=1, default=str))
    chosen = report.total.get("analytic_gbt")
    return {"setting": f"latency profile {len(data)} points x {args.profile_settings.repeats}",
            "seconds": time.perf_counter() - start,
            "checks": (f"held-out MAPE {chosen.mape:.1f}%, within 10% {100 * chosen.within_10:.0f}% "
                       f"({report.holdout_rows} rows)") if chosen else "no held-out rows"}


def _tier_episodes(backend, estimator, probe) -> list[dict]:
    """One MultiKnob-v0 episode per tier (top-k and depth at their highest) and TokenBudget-v0 extremes."""
    import numpy as np

    rows = []
    env = fs.make_knob_env("MultiKnob-v0", backend, estimator)
    if isinstance(env, str):
        rows.append({"setting": "MultiKnob-v0: not supported", "seconds": None, "checks": env})
    else:
        nvec = env.action_space.nvec
        for tier in range(int(nvec[0])):
            action = np.concatenate([[tier], nvec[1:] - 1])
            rows.append(fs.knob_env_episode(env, "MultiKnob-v0", backend, probe, action, f"tier {tier}"))
        env.close()
    rows += fs.knob_env_episodes("TokenBudget-v0", backend, estimator, probe)
    return rows


def run_one(name: str, quant: str, ckpt: Path, dataset: Path, args, device, out_dir: Path) -> dict:
    from bench._hooks import ComputeProbe

    result = {"model": name, "quantization": quant, "rows": []}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with GpuMemoryMonitor() as monitor:
        try:
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            backend = fs.load_through_backend_hf(ckpt, dataset, precision="bf16",
                                                 quantization=None if quant == "bf16" else quant,
                                                 device=str(device), max_new_tokens=args.max_new_tokens)
            torch.cuda.synchronize(device)
            result["load_s"] = time.perf_counter() - start
            if quant == "bf16" or quant == fs.load_architecture(name).quantization:
                fs.check_loaded_weights(backend.model, ckpt)
            sample = backend.samples("validation")[0]
            with ComputeProbe(backend.model) as probe:
                if backend.knob_space.has_vision:
                    result["rows"] += fs.check_tiers(backend, sample, probe)
                rows, runs = fs.check_runs(backend, sample, probe)
                result["rows"] += rows
                if (name, quant) == TIER_EPISODES:
                    result["rows"] += _tier_episodes(backend, fs.calibrated_estimator(backend, runs), probe)
            if (name, quant) in PROFILED:
                result["rows"].append(_profile(backend, name, quant, args, out_dir))
            result["ok"] = True
        except fs.CheckFailed as failure:
            result.update(ok=False, error=f"check failed: {failure}")
        finally:
            backend = None
            gc.collect()
            torch.cuda.synchronize(device)
            result["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.empty_cache()
    result["nvidia_smi_peak_gb"] = monitor.peak_mib / 1024 if monitor.peak_mib is not None else None
    return result


def format_table(results: list[dict], gpu: str) -> str:
    header = ("model", "precision", "load s", "knob setting", "s", "checked", "max allocated", "nvidia-smi peak")
    lines = [f"GPU: {gpu}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        rows = r["rows"] + ([{"setting": "FAILED", "seconds": None, "checks": r["error"]}] if not r.get("ok") else [])
        for i, row in enumerate(rows or [{"setting": "-", "seconds": None, "checks": "-"}]):
            first = i == 0
            smi = r.get("nvidia_smi_peak_gb")
            cells = [r["model"] if first else "", r["quantization"] if first else "",
                     f"{r['load_s']:.1f}" if first and "load_s" in r else "", row["setting"],
                     f"{row['seconds']:.2f}" if row["seconds"] is not None else "-", row["checks"],
                     f"{r['max_memory_allocated_gb']:.1f} GB" if first else "",
                     (f"{smi:.1f} GB" if smi is not None else "n/a") if first else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    device = require_cuda()
    out_dir = args.out_dir
    out_dir.mkdir(parents=True)
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="knobgym-gpu-check-"))
    gpu = torch.cuda.get_device_name(device)
    versions = {p: _version(p) for p in ("torch", "transformers", "bitsandbytes", "accelerate")}
    results = []
    started = time.perf_counter()
    try:
        for name in args.model_list:
            arch = fs.load_architecture(name)
            ckpt, data_dir = work_dir / name, work_dir / f"{name}-data"
            print(f"[{name}] building the checkpoint", file=sys.stderr, flush=True)
            blocks = fs.blocks_under(arch, 1.0, arch.max_peak_gb, fs._log) if arch.max_peak_gb else None
            built = fs.write_checkpoint(arch, ckpt, blocks=blocks)
            dataset = fs.write_dataset(arch, data_dir, n_questions=8)
            for quant in quantizations_of(arch, args.quant_list):
                print(f"[{name}] {quant}", file=sys.stderr, flush=True)
                result = run_one(name, quant, ckpt, dataset, args, device, out_dir)
                result.update(parameters=built["parameters"], build_s=built["build_s"])
                results.append(result)
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(data_dir, ignore_errors=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    table = format_table(results, gpu)
    summary = {"gpu": gpu, "versions": versions, "total_s": time.perf_counter() - started,
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "results": results}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    (out_dir / "table.md").write_text(table + "\n")
    print(table)
    print(f"results in {out_dir} ({summary['total_s']:.0f} s)")
    failed = [r for r in results if not r.get("ok")]
    for r in failed:
        print(f"error: {r['model']} {r['quantization']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = validate(parse_args(argv))
        for line in plan(args):
            print(line)
        return run(args)
    except (GpuCheckError, fs.FullSizeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NeedsCuda as error:
        print(f"error: {error}", file=sys.stderr)
        return NEEDS_CUDA_EXIT


if __name__ == "__main__":
    sys.exit(main())
