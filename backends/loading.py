"""Loading a Hugging Face model the way a serving engineer would.

``ModelSpec`` (what to load, precision, attention, placement), ``QuantizationSpec``
(bitsandbytes 4/8-bit) and ``GenerationSettings`` (decoding, honoured by every backend) are
plain dataclasses with documented defaults; :func:`load_model` turns them into a loaded model
with the revision actually loaded recorded.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from backends.progress import quiet_library_bars

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
                  "torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16", "auto": "auto"}
QUANT_TYPES = ("nf4", "fp4", "int8")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


class SpecError(ValueError):
    """A bad model / quantization / generation setting (names the key or value and what is accepted)."""


def _check_choice(name: str, value: Any, accepted) -> Any:
    if value not in accepted:
        raise SpecError(f"{name}={value!r} is invalid; accepted: {', '.join(map(str, accepted))}")
    return value


@dataclass(frozen=True)
class QuantizationSpec:
    """bitsandbytes quantization, on any device the installed bitsandbytes runs it on
    (:func:`bitsandbytes_devices`: CUDA, and the CPU since bitsandbytes 0.49). On a CPU with
    AVX512-BF16, 4-bit layers whose shapes bitsandbytes' fast kernel cannot take run on its generic
    path (:func:`backends.quantized.keep_cpu_4bit_layers_runnable`, applied by :func:`load_model`).

    Args:
        enabled: quantize on load (default False).
        quant_type: ``nf4`` or ``fp4`` (4-bit) or ``int8`` (8-bit) (default ``nf4``).
        compute_dtype: dtype of the 4-bit matmuls, one of fp32/fp16/bf16 (default ``bf16``).
        double_quant: quantize the 4-bit quantization constants too (default True).
    """

    enabled: bool = False
    quant_type: str = "nf4"
    compute_dtype: str = "bf16"
    double_quant: bool = True

    def __post_init__(self) -> None:
        _check_choice("quantization.quant_type", self.quant_type, QUANT_TYPES)
        _check_choice("quantization.compute_dtype", self.compute_dtype, tuple(PRECISIONS))

    def to_bitsandbytes_config(self):
        """The ``transformers.BitsAndBytesConfig`` for this spec (``None`` when disabled)."""
        if not self.enabled:
            return None
        from transformers import BitsAndBytesConfig

        if self.quant_type == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_compute_dtype=PRECISIONS[self.compute_dtype],
                                  bnb_4bit_use_double_quant=self.double_quant)


@dataclass(frozen=True)
class ModelSpec:
    """What to load and how.

    Args:
        model: hub id (``llava-hf/llava-1.5-7b-hf``) or local directory.
        revision: branch, tag or commit of a hub id (default ``main``); the commit actually loaded is
            recorded by :func:`load_model`.
        local_files_only: never touch the network (default True: runs must be reproducible offline).
        precision: ``fp32`` / ``fp16`` / ``bf16`` (default ``fp32``, the only one fast on every CPU).
        attn_implementation: ``eager``, ``sdpa`` (default), ``flash_attention_2``, ...
        device: one device (``cpu``, ``cuda``, ``cuda:1``); the model goes there whole, i.e.
            ``device_map={"": device}``, so placement is deterministic.
        device_map: ``None`` (use ``device``) or ``"auto"`` / an explicit map, only when asked.
        trust_remote_code: run code shipped with a checkpoint (default False).
        quantization: a :class:`QuantizationSpec`.
    """

    model: str
    revision: str = "main"
    local_files_only: bool = True
    precision: str = "fp32"
    attn_implementation: str = "sdpa"
    device: str = "cpu"
    device_map: Any = None
    trust_remote_code: bool = False
    quantization: QuantizationSpec = field(default_factory=QuantizationSpec)

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model).strip():
            raise SpecError(f"model={self.model!r} is invalid; accepted: a hub id or a local directory path")
        _check_choice("precision", self.precision, tuple(PRECISIONS))
        _check_choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        if not (self.device == "cpu" or self.device == "mps" or str(self.device).startswith("cuda")):
            raise SpecError(f"device={self.device!r} is invalid; accepted: cpu, cuda, cuda:N, mps")
        if self.device_map is not None and not (self.device_map == "auto" or isinstance(self.device_map, Mapping)):
            raise SpecError(f"device_map={self.device_map!r} is invalid; accepted: None, 'auto' or a dict")
        quantization_placement_error = _quantization_placement_error(self)
        if quantization_placement_error:
            raise SpecError(quantization_placement_error)

    @property
    def resolved_device_map(self) -> Any:
        return self.device_map if self.device_map is not None else {"": self.device}

    @property
    def is_local(self) -> bool:
        return Path(str(self.model)).expanduser().exists() or str(self.model).startswith((".", "/", "~"))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings every backend honours (nothing silently forces greedy).

    Args:
        max_new_tokens: upper bound on generated tokens (default 8: VQA answers are short).
        min_new_tokens: lower bound (default 1: an empty answer is a failure, not a choice).
        do_sample: sample instead of greedy (default False).
        temperature: sampling temperature, used when ``do_sample`` (default 1.0).
        top_p: nucleus sampling mass, used when ``do_sample`` (default 1.0).
        seed: seed of the sampling generator, so sampled runs are reproducible (default 0).
    """

    max_new_tokens: int = 8
    min_new_tokens: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise SpecError(f"max_new_tokens={self.max_new_tokens!r} is invalid; accepted: an integer >= 1")
        if not (isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens <= self.max_new_tokens):
            raise SpecError(f"min_new_tokens={self.min_new_tokens!r} is invalid; accepted: an integer in "
                            f"[0, max_new_tokens={self.max_new_tokens}]")
        if not (self.temperature > 0):
            raise SpecError(f"temperature={self.temperature!r} is invalid; accepted: > 0")
        if not (0 < self.top_p <= 1):
            raise SpecError(f"top_p={self.top_p!r} is invalid; accepted: 0 < top_p <= 1")


#: the bitsandbytes operators a 4-bit or 8-bit ``nn.Linear`` replacement calls in a forward pass
_BNB_OPS = {"4bit": ("quantize_4bit", "dequantize_4bit"),
            "int8": ("int8_vectorwise_quant", "int8_linear_matmul", "int8_mm_dequant")}


def bitsandbytes_devices(quant_type: str = "nf4") -> tuple[str, ...]:
    """Device types (``cpu``, ``cuda``, ...) on which the installed bitsandbytes runs ``quant_type``.

    Decided from what bitsandbytes itself declares, never from a fixed list: a device type is
    accepted when it is in ``bitsandbytes.supported_torch_devices`` (what transformers checks at
    load) and every operator the quantized layer calls has a kernel for that device's dispatch
    key or a device-generic (``CompositeExplicitAutograd``: plain torch) implementation. Empty when
    bitsandbytes (or accelerate, which transformers needs to quantize) is not importable.
    """
    try:
        import accelerate  # noqa: F401  transformers' bitsandbytes loading needs it
        import bitsandbytes
    except Exception:  # an ImportError, or a broken native library
        return ()
    declared = set(getattr(bitsandbytes, "supported_torch_devices", ()) or ())
    names = _BNB_OPS["int8" if quant_type == "int8" else "4bit"]
    accepted = []
    for device_type in sorted(declared):
        key = "CUDA" if device_type == "cuda" else device_type.upper()
        try:
            ops = [getattr(torch.ops.bitsandbytes, n).default.name() for n in names]
            ok = all(torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
                     or torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeExplicitAutograd") for op in ops)
        except (AttributeError, RuntimeError):  # an operator this bitsandbytes does not define, or no such key
            ok = False
        if ok:
            accepted.append(device_type)
    return tuple(accepted)


def _device_type(place: Any) -> str:
    """``cuda`` for ``cuda:1`` or an integer index, else the string's device type."""
    if isinstance(place, int) and not isinstance(place, bool):
        return "cuda"
    return str(place).split(":")[0]


def _quantization_placement_error(spec: ModelSpec) -> str | None:
    """The one rule for quantization: every module of a quantized model is placed on a device
    type the installed bitsandbytes runs its quant type on (:func:`bitsandbytes_devices`), and
    (as transformers requires without fp32 offload) a ``device_map`` does not mix the CPU with an
    accelerator. ``None`` when the rule holds."""
    if not spec.quantization.enabled:
        return None
    quant_type = spec.quantization.quant_type
    accepted = bitsandbytes_devices(quant_type)
    if not accepted:
        return (f"quantization={quant_type!r} needs bitsandbytes (and accelerate), which are not importable here; "
                f"accepted: pip install bitsandbytes accelerate, or quantization null")
    wanted = {str(spec.device)}
    if isinstance(spec.device_map, Mapping):
        wanted = {str(v) if not isinstance(v, int) or isinstance(v, bool) else f"cuda:{v}"
                  for v in spec.device_map.values()}
    off = sorted(w for w in wanted if _device_type(w) not in accepted)
    if off:
        where = f"device={spec.device!r}" if not isinstance(spec.device_map, Mapping) else f"device_map places {off}"
        return (f"quantization={quant_type!r} cannot run on {', '.join(off)} ({where}): bitsandbytes "
                f"{_bnb_version()} runs it on {', '.join(accepted)}; accepted: a device of those types, or "
                f"quantization null")
    if len({_device_type(w) for w in wanted}) > 1 and "cpu" in {_device_type(w) for w in wanted}:
        return (f"quantization={quant_type!r} with device_map {dict(spec.device_map)} mixes the CPU with an "
                f"accelerator; accepted: every module on one kind of device, or quantization null")
    return None


def _bnb_version() -> str:
    import bitsandbytes

    return bitsandbytes.__version__


def check_device_available(spec: ModelSpec) -> None:
    """One clear error when the spec asks for a device this machine does not have (checked at load)."""
    wants = {str(spec.device)}
    if isinstance(spec.device_map, Mapping):
        wants |= {f"cuda:{v}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
                  for v in spec.device_map.values()}
    if any(w.startswith("cuda") for w in wants):
        if not torch.cuda.is_available():
            raise SpecError(f"device={spec.device!r} needs CUDA, but torch.cuda.is_available() is False on this "
                            f"machine (torch {torch.__version__}); accepted: device=cpu, or run "
                            f"on a machine with a GPU and a CUDA build of torch")
        count = torch.cuda.device_count()
        for w in wants:
            if w.startswith("cuda:") and not (w[5:].isdigit() and int(w[5:]) < count):
                raise SpecError(f"device {w!r} does not exist; accepted: cuda:0..cuda:{count - 1}")
    if "mps" in wants and not torch.backends.mps.is_available():
        raise SpecError("device='mps' needs Apple's MPS backend, which is not available here; accepted: cpu or cuda")


# ---------------------------------------------------------------------------------------------
# Building specs from user dicts (Hydra configs, CLI overrides), with legacy keys normalised.
# ---------------------------------------------------------------------------------------------
_LEGACY_KEYS = {
    "load_in_4bit": "quantization.enabled=True, quantization.quant_type='nf4'",
    "load_in_8bit": "quantization.enabled=True, quantization.quant_type='int8'",
    "bnb_4bit_quant_type": "quantization.quant_type",
    "bnb_4bit_compute_dtype": "quantization.compute_dtype",
    "bnb_4bit_use_double_quant": "quantization.double_quant",
    "torch_dtype": "precision",
    "dtype": "precision",
    "model_name_or_path": "model",
    "pretrained_model_name_or_path": "model",
}


def _normalise_dtype(value: Any) -> str:
    if isinstance(value, torch.dtype):
        value = str(value)
    key = str(value).lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key == "auto":
        return "fp32"
    return key


def model_spec_from_dict(options: Mapping[str, Any]) -> ModelSpec:
    """Build a :class:`ModelSpec` from a flat or nested dict.

    Legacy keys (``load_in_4bit``, ``load_in_8bit``, ``bnb_4bit_quant_type``, ``torch_dtype``, ...)
    are accepted and normalised with a ``DeprecationWarning``; unknown keys are a
    :class:`SpecError` naming the key and listing the accepted ones.
    """
    opts = dict(options)
    quant = dict(opts.pop("quantization", None) or {})
    unknown_quant = set(quant) - {f.name for f in dataclasses.fields(QuantizationSpec)}
    if unknown_quant:
        raise SpecError(f"unknown quantization key(s) {sorted(unknown_quant)}; accepted: "
                        f"{', '.join(f.name for f in dataclasses.fields(QuantizationSpec))}")
    if opts.get("load_in_4bit") and opts.get("load_in_8bit"):
        raise SpecError("load_in_4bit=True and load_in_8bit=True conflict; accepted: at most one of them "
                        "(or quantization.quant_type='nf4'/'fp4'/'int8')")
    for legacy in [k for k in opts if k in _LEGACY_KEYS]:
        value = opts.pop(legacy)
        warnings.warn(f"model spec key {legacy!r} is deprecated; use {_LEGACY_KEYS[legacy]}",
                      DeprecationWarning, stacklevel=2)
        if legacy == "load_in_4bit":
            if value:
                quant["enabled"] = True
                quant.setdefault("quant_type", "nf4")
        elif legacy == "load_in_8bit":
            if value:
                quant["enabled"] = True
                quant["quant_type"] = "int8"
        elif legacy == "bnb_4bit_quant_type":
            quant["quant_type"] = value
        elif legacy == "bnb_4bit_compute_dtype":
            quant["compute_dtype"] = _normalise_dtype(value)
        elif legacy == "bnb_4bit_use_double_quant":
            quant["double_quant"] = bool(value)
        elif legacy in ("torch_dtype", "dtype"):
            opts["precision"] = _normalise_dtype(value)
        else:
            opts["model"] = value
    accepted = [f.name for f in dataclasses.fields(ModelSpec) if f.name != "quantization"]
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise SpecError(f"unknown model spec key(s) {unknown}; accepted: {', '.join(accepted + ['quantization'])} "
                        f"(legacy, normalised with a warning: {', '.join(_LEGACY_KEYS)})")
    if "model" not in opts:
        raise SpecError("model spec needs 'model' (a hub id or a local directory path)")
    if "precision" in opts:
        opts["precision"] = _normalise_dtype(opts["precision"])
    return ModelSpec(quantization=QuantizationSpec(**quant), **opts)


def quantization_options(value: Any) -> dict:
    """A backend option ``quantization`` (``nf4`` / ``fp4`` / ``int8`` / null, or a dict of
    :class:`QuantizationSpec` fields) as the ``quantization`` dict of a model spec."""
    if value is None or value is False:
        return {}
    if isinstance(value, str):
        if value not in QUANT_TYPES:
            raise SpecError(f"quantization={value!r} is invalid; accepted: {', '.join(QUANT_TYPES)} or null")
        return {"enabled": True, "quant_type": value}
    if isinstance(value, Mapping):
        return {"enabled": True, **dict(value)}
    raise SpecError(f"quantization={value!r} is invalid; accepted: {', '.join(QUANT_TYPES)}, null, or a dict "
                    f"(quant_type, compute_dtype, double_quant)")


def generation_settings_from_dict(options: Mapping[str, Any] | None) -> GenerationSettings:
    opts = dict(options or {})
    accepted = [f.name for f in dataclasses.fields(GenerationSettings)]
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise SpecError(f"unknown generation key(s) {unknown}; accepted: {', '.join(accepted)}")
    return GenerationSettings(**opts)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
class ModelNotAvailableError(SpecError, FileNotFoundError):
    """The model is not on disk (and we do not download at run time); a ValueError too, so the CLI
    reports it as one line."""


def check_checkpoint_out_dir(out: str | Path, overwrite: bool) -> None:
    """Refuse a training script's ``--out`` that already holds files unless ``--overwrite`` was given.

    Why: training scripts rewrite their output directory (every few hundred steps, atomically),
    and the shipped tiny models live in the package: a mistyped or default ``--out`` must never
    replace someone's model.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out={str(out)!r} already holds files; accepted: a new or empty directory, "
                         f"or --overwrite to replace it")


def write_directory_atomically(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Build a directory with ``write(staging_dir)`` in a sibling temporary folder, then swap it in
    for ``target``.

    Why: training scripts rewrite their checkpoint every few hundred steps; a run killed mid-save
    (or a reader loading meanwhile) must find either the old checkpoint or the new one, never half
    of one. The old directory is moved aside before the new one takes its name and removed last.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp creates it private; a checkpoint is meant to be shared
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


@dataclass
class LoadedModel:
    """A loaded model with what it takes to run and to log it.

    ``chat_template``: the model's chat template (the tokenizer's, else a processor's
    ``chat_template.json`` / ``chat_template.jinja`` beside the weights), ``None`` when it has none.
    """

    model: Any
    tokenizer: Any
    image_processor: Any
    spec: ModelSpec
    revision_loaded: str  # commit hash for hub snapshots, or a content hash of a local directory
    chat_template: str | None = None

    @property
    def identity(self) -> dict:
        """What was loaded. ``content_revision`` names the checkpoint's content, never its path, so
        clones of a repository share caches keyed on it: the hub snapshot's commit hash for a hub
        id, else the content hash of the local directory (:func:`_local_revision`)."""
        return {"model": str(self.spec.model), "revision": self.revision_loaded,
                "content_revision": self.revision_loaded, "precision": self.spec.precision,
                "model_class": type(self.model).__name__, "device": str(self.spec.device),
                "quantization": dataclasses.asdict(self.spec.quantization)}


def local_model_dir(spec: ModelSpec) -> Path | None:
    """The checkpoint directory of a local ``spec.model`` (``None`` for a hub id); a local path that is
    missing or holds no ``config.json`` is a :class:`ModelNotAvailableError`. Cheap: reads no weights, so
    a command checks it before any work (:func:`backends.registry.check_backend`)."""
    path = Path(str(spec.model)).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(f"local model directory {str(path)!r} has no config.json; accepted: a "
                                         f"directory written by save_pretrained()")
        return path
    if spec.is_local:
        raise ModelNotAvailableError(f"local model path {str(path)!r} does not exist; pass an existing directory "
                                     f"written by save_pretrained(), or a hub id already in the Hugging Face cache")
    return None


def resolve_model_path(spec: ModelSpec) -> tuple[Path, str]:
    """Local directory holding the checkpoint, and the revision it represents.

    Hub ids are resolved from the local Hugging Face cache only; a miss is one clear error that
    says how to make the model available (this package never downloads at run time).
    """
    path = local_model_dir(spec)
    if path is not None:
        return path, _local_revision(path)
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(repo_id=str(spec.model), revision=spec.revision, local_files_only=True)
    except Exception as exc:  # the hub client raises several types for "not cached"
        raise ModelNotAvailableError(
            f"model {spec.model!r} at revision {spec.revision!r} is not in the local Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE') or os.environ.get('HF_HOME') or '~/.cache/huggingface'}), and "
            f"knobgym never downloads at run time. Make it available with "
            f"`hf download {spec.model} --revision {spec.revision}` on a machine with network, "
            f"or pass a local directory as model=... ({type(exc).__name__})") from None
    return Path(snapshot), Path(snapshot).name


_SMALL_FILE_BYTES = 64 << 20  # weight files up to this size are hashed whole
_HEADER_BYTES = 1 << 20  # a safetensors header (tensor names, shapes, offsets) fits in it
_WEIGHT_WINDOWS, _WINDOW_BYTES = 64, 1 << 14
_HASHED_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".safetensors", ".bin")


def _local_revision(path: Path) -> str:
    """A short content hash of a local checkpoint directory (its ``content_revision``).

    The rule: every config / tokenizer / template file (``.json``, ``.jinja``, ``.txt``,
    ``.model``) is hashed whole with its name; a weight file (``.safetensors``, ``.bin``) of up to
    64 MiB is hashed whole, a larger one by its name, size, first MiB (the safetensors header: tensor
    names, shapes, dtypes) and 64 windows of 16 KiB spread evenly over it. Paths never enter, so a
    clone or copy of a checkpoint has the same revision and two checkpoints of the same shapes with
    different weights differ; a 15 GB checkpoint costs about 2 MiB of reading.
    """
    import hashlib

    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if not (f.is_file() and f.suffix in _HASHED_SUFFIXES):
            continue
        h.update(f.name.encode())
        size = f.stat().st_size
        if f.suffix not in (".safetensors", ".bin") or size <= _SMALL_FILE_BYTES:
            h.update(f.read_bytes())
            continue
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_HEADER_BYTES))
            for i in range(_WEIGHT_WINDOWS):
                fh.seek(i * max(0, size - _WINDOW_BYTES) // max(1, _WEIGHT_WINDOWS - 1))
                h.update(fh.read(_WINDOW_BYTES))
    return "local-" + h.hexdigest()[:12]


def _processor_chat_template(path: Path) -> str | None:
    """A processor's chat template saved beside the weights (``chat_template.json`` or ``.jinja``)."""
    import json

    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    legacy = path / "chat_template.json"
    if legacy.is_file():
        try:
            return json.loads(legacy.read_text()).get("chat_template")
        except (ValueError, AttributeError):
            raise ModelNotAvailableError(f"{str(legacy)!r} is not a JSON object with a 'chat_template' string; "
                                         f"accepted: the file a processor's save_pretrained writes") from None
    return None


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load model, tokenizer and image processor (when there is one) for ``spec``."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    check_device_available(spec)
    quiet_library_bars("transformers")  # no "Loading weights" bar states in a piped log
    path, revision = resolve_model_path(spec)
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=spec.trust_remote_code)
    model_cls = _model_class_for(config, transformers)
    kwargs: dict[str, Any] = dict(local_files_only=True, trust_remote_code=spec.trust_remote_code,
                                  attn_implementation=spec.attn_implementation,
                                  device_map=spec.resolved_device_map)
    stored = stored_quantization(config, spec)
    qconfig = spec.quantization.to_bitsandbytes_config()
    if qconfig is not None:
        if stored is None:  # a stored checkpoint's own config is what transformers applies
            kwargs["quantization_config"] = qconfig
        kwargs["dtype"] = PRECISIONS[spec.quantization.compute_dtype]
    else:
        kwargs["dtype"] = PRECISIONS[spec.precision]
    model = model_cls.from_pretrained(path, **kwargs)
    model.eval()
    if qconfig is not None:
        from backends.quantized import bitsandbytes_messages_once, keep_cpu_4bit_layers_runnable

        bitsandbytes_messages_once()
        keep_cpu_4bit_layers_runnable(model)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=spec.trust_remote_code)
    image_processor = None
    if hasattr(config, "vision_config"):
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True,
                                                             trust_remote_code=spec.trust_remote_code)
    chat_template = tokenizer.chat_template if tokenizer.chat_template is not None else _processor_chat_template(path)
    return LoadedModel(model, tokenizer, image_processor, spec, revision, chat_template)


def stored_quantization(config, spec: ModelSpec) -> QuantizationSpec | None:
    """The bitsandbytes quantization a checkpoint was saved in (its ``config.json``'s
    ``quantization_config``), checked against the one ``spec`` asks for; ``None`` when it is stored
    unquantized.

    transformers loads a pre-quantized checkpoint as stored, whatever quantization the caller passes
    (with a warning), so a spec that disagrees would label, cache and profile a model it is not: that
    is a :class:`SpecError` naming both. A quantization scheme other than bitsandbytes is accepted
    only when the spec asks for none (it loads as stored, through transformers' own support for it).
    """
    stored = getattr(config, "quantization_config", None)
    if stored is None:
        return None
    stored = stored if isinstance(stored, Mapping) else stored.to_dict()
    method = str(stored.get("quant_method", "unknown"))
    asked = spec.quantization
    if method != "bitsandbytes":
        if asked.enabled:
            raise SpecError(f"model {str(spec.model)!r} is stored quantized with {method!r}, not bitsandbytes; "
                            f"accepted: quantization=null for it (it loads as stored)")
        return None
    if stored.get("load_in_8bit"):
        found = QuantizationSpec(enabled=True, quant_type="int8", compute_dtype=asked.compute_dtype,
                                 double_quant=asked.double_quant)
    else:
        found = QuantizationSpec(enabled=True, quant_type=str(stored.get("bnb_4bit_quant_type", "fp4")),
                                 compute_dtype=_normalise_dtype(stored.get("bnb_4bit_compute_dtype", "float32")),
                                 double_quant=bool(stored.get("bnb_4bit_use_double_quant", False)))
    if asked != found:
        raise SpecError(f"model {str(spec.model)!r} is stored quantized by bitsandbytes ({_described(found)}), and "
                        f"transformers loads it as stored; asked: {_described(asked)}; accepted: "
                        f"quantization={_described(found)}")
    return found


def _described(quantization: QuantizationSpec) -> str:
    if not quantization.enabled:
        return "none"
    if quantization.quant_type == "int8":
        return "int8"
    return (f"{quantization.quant_type} with compute_dtype={quantization.compute_dtype}, "
            f"double_quant={quantization.double_quant}")


def _model_class_for(config, transformers):
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch and hasattr(transformers, arch):
        return getattr(transformers, arch)
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
