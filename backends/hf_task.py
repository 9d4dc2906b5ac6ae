"""``backend=hf``: any Hugging Face checkpoint on a user's dataset.

From the CLI::

    python train.py backend=hf backend.model=llava-hf/llava-1.5-7b-hf backend.dataset=data/vqa.jsonl \\
        backend.quantization=nf4

or ``gym.make("MultiKnob-v0", backend={"name": "hf", "model": ..., "dataset": ...})``. Every key of
``conf/backend/hf.yaml`` is a keyword argument of :func:`load_hf_backend`; the presets in
``conf/backend/`` (``llava-1.5-7b``, ``idefics2-8b``, ``olmoe-1b-7b``, ``pythia-2.8b``) fill them in.
"""

from __future__ import annotations

from typing import Any, Mapping

from backends.hf import HFBackend
from backends.knobs import knob_space_from_model
from backends.loading import (GenerationSettings, SpecError, generation_settings_from_dict, load_model,
                              local_model_dir, model_spec_from_dict, quantization_options)
from backends.threads import DEFAULT_TORCH_THREADS, check_num_threads, set_torch_threads
from backends.vqa_data import DataError, VQADataset, check_dataset_paths, dataset_spec_from_options

KNOB_KEYS = ("tiers", "tier_sizes", "top_ks", "depths", "token_budgets")


def load_hf_backend(model: str | None = None, dataset: Any = None, *, revision: str = "main",
                    precision: str = "fp32", device: str = "cpu", device_map: Any = None,
                    quantization: Any = None, attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                    generation: Mapping | GenerationSettings | None = None, chat_template: bool | str = True,
                    prompt_template: str | None = None, tier_mode: str | None = None,
                    knobs: Mapping | None = None, columns: Mapping | None = None, splits: Mapping | None = None,
                    split_fractions: Any = None, split_seed: int = 0, max_samples: int | None = None,
                    num_threads: int | None = DEFAULT_TORCH_THREADS, hub_id: str | None = None,
                    check_only: bool = False, **unknown: Any) -> HFBackend | None:
    """Load ``model`` and ``dataset`` into an :class:`~backends.hf.HFBackend`.

    Args:
        model: a local directory written by ``save_pretrained`` or a hub id already in the local
            Hugging Face cache (nothing is downloaded; a miss is one error saying how to get it).
        dataset: a JSON-lines file, a ``{split: file}`` mapping, or a ``save_to_disk`` directory
            (:mod:`backends.vqa_data`).
        revision: branch, tag or commit of a hub id (default ``main``).
        precision: ``fp32`` (default) / ``fp16`` / ``bf16``.
        device: ``cpu`` (default), ``cuda``, ``cuda:N``; ``device_map``: null, ``auto`` or a dict.
        quantization: ``nf4``, ``fp4``, ``int8`` (bitsandbytes, on any device it runs on: CUDA, the
            CPU) or null.
        attn_implementation: ``sdpa`` (default), ``eager``, ``flash_attention_2``, ...
        trust_remote_code: run code shipped with a checkpoint (default False).
        generation: decoding settings (:class:`~backends.loading.GenerationSettings` fields).
        chat_template: True (default): the model's chat template when it has one; False: never; a
            string: that Jinja template.
        prompt_template: a template string with ``{question}`` (and the image token once for a
            vision model), used instead of any chat template.
        tier_mode: ``resize`` (the tier sets the image size the encoder sees) or ``pool`` (pooling
            after the tower); null: the checkpoint's saved mode, else ``resize``.
        knobs: knob ranges: ``tiers`` (name -> tokens), ``tier_sizes`` (name -> px), ``top_ks``,
            ``depths``, ``token_budgets``; unset ones come from the model's config.
        columns, splits, split_fractions, split_seed, max_samples: how to read ``dataset``
            (:class:`~backends.vqa_data.DatasetSpec`).
        num_threads: torch intra-op threads for the process (default
            :data:`backends.threads.DEFAULT_TORCH_THREADS`, as every backend and the CLI, so the
            latency cache entry is shared); null leaves torch's setting alone.
        hub_id: informational: the hub id a preset expects (``model`` may point at a local copy of it).
        check_only: validate every option and that the model and dataset paths exist, load nothing,
            return ``None`` (:func:`check_hf_backend`).
    """
    if unknown:
        import inspect

        accepted = [p for p in inspect.signature(load_hf_backend).parameters if p not in ("unknown", "check_only")]
        raise SpecError(f"unknown backend=hf option(s) {sorted(unknown)}; accepted: {', '.join(accepted)}")
    if model is None or (isinstance(model, str) and not model.strip()):
        raise SpecError("backend=hf needs model=<a local directory or a hub id in the local Hugging Face cache>; "
                        "e.g. backend.model=backends/tiny/checkpoint")
    if dataset is None:
        raise DataError("backend=hf needs dataset=<a JSON-lines file, a {train: file, validation: file, test: file} "
                        "mapping, or a save_to_disk directory>; e.g. backend.dataset=data/vqa.jsonl")
    knobs = dict(knobs or {})
    unknown = sorted(set(knobs) - set(KNOB_KEYS))
    if unknown:
        raise SpecError(f"unknown knobs key(s) {unknown}; accepted: {', '.join(KNOB_KEYS)}")
    if num_threads is not None:
        threads = check_num_threads(num_threads, SpecError)
        if not check_only:
            set_torch_threads(threads)
    if not isinstance(chat_template, (bool, str)):
        raise SpecError(f"chat_template={chat_template!r} is invalid; accepted: true, false or a Jinja template string")
    spec = model_spec_from_dict({"model": str(model), "revision": revision, "precision": precision,
                                 "device": device, "device_map": device_map,
                                 "attn_implementation": attn_implementation, "trust_remote_code": trust_remote_code,
                                 "quantization": quantization_options(quantization)})
    settings = generation if isinstance(generation, GenerationSettings) else generation_settings_from_dict(generation)
    data_options = {"columns": columns, "splits": splits, "split_fractions": split_fractions,
                    "split_seed": split_seed, "max_samples": max_samples}
    data_spec = dataset_spec_from_options(dataset, **data_options)  # bad options fail before the model loads
    local_model_dir(spec)  # a missing model or dataset path, too
    check_dataset_paths(data_spec)
    if check_only:
        return None
    loaded = load_model(spec)
    space_kwargs = {k: (tuple(v) if k in ("top_ks", "depths", "token_budgets") else dict(v))
                    for k, v in knobs.items() if v is not None}
    space = knob_space_from_model(loaded.model, tier_mode=tier_mode, **space_kwargs)
    task = VQADataset(data_spec, needs_image=space.has_vision)
    return HFBackend(loaded, task, generation=settings, prompt_template=prompt_template, knob_space=space,
                     name="hf", chat_template=chat_template)


def check_hf_backend(**options: Any) -> None:
    """Every ``backend=hf`` option checked and the model and dataset paths found, nothing loaded: the
    same checks :func:`load_hf_backend` makes first, so a command says a bad option in one line
    before any work (registered with :func:`backends.registry.register_backend`)."""
    load_hf_backend(**options, check_only=True)
