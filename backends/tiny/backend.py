"""``backend=tiny``: the shipped tiny reference model over the procedural VQA task.

Loads the committed checkpoint through the same ``load_model`` path as any local checkpoint
(no network, no GPU) and serves the generator's fixed splits lazily (a sample is rendered when
first asked for), scored by VQA-normalised exact match.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from backends.base import Sample, check_split
from backends.hf import HFBackend
from backends.loading import GenerationSettings, ModelSpec, generation_settings_from_dict, load_model
from backends.threads import DEFAULT_TORCH_THREADS, set_torch_threads
from backends.tiny import data
from backends.tiny.tasks import checkpoint_task, task_module, task_name

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"


class LazySplit(Sequence):
    """The fixed samples of one split, rendered on access; the :attr:`CACHE_SIZE` most recently
    used are kept (a sample is a pure function of (split, index, seed), so one rendered again is
    the same sample, and memory stays flat however many samples a run visits)."""

    #: rendered samples kept per split
    CACHE_SIZE = 512

    def __init__(self, split: str, seed: int = data.DEFAULT_SEED, size: int | None = None, task=data):
        self.split, self.seed, self.task = check_split(split), seed, task
        self.size = data.SPLIT_SIZES[split] if size is None else int(size)
        self._get = lru_cache(maxsize=self.CACHE_SIZE)(self._make)

    def _make(self, index: int) -> Sample:
        return self.task.make_sample(self.split, index, self.seed)

    # A split is data: pickled and copied (gym's spec, vector envs) by its task's name, not its module.
    def __getstate__(self) -> dict:
        return {"split": self.split, "seed": self.seed, "size": self.size, "task": task_name(self.task)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["split"], state["seed"], state["size"], task_module(state["task"]))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.size))]
        index = int(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"sample index {index} out of range for split {self.split!r} (size {self.size})")
        return self._get(index)


class TinyVQATask:
    """A procedural VQA task (``task``: the data module, v1 by default): splits and exact-match scoring."""

    def __init__(self, seed: int = data.DEFAULT_SEED, split_sizes: dict | None = None, task=data):
        sizes = {**data.SPLIT_SIZES, **(split_sizes or {})}
        self.question_types = task.QUESTION_TYPES
        self._splits = {s: LazySplit(s, seed, sizes[s], task) for s in data.SPLIT_SIZES}

    def samples(self, split: str) -> Sequence[Sample]:
        return self._splits[check_split(split)]

    def score(self, answer: str, sample: Sample) -> float:
        return data.score_answer(answer, sample.reference or "")


def load_tiny_backend(checkpoint: str | None = None, generation: dict | GenerationSettings | None = None,
                      device: str = "cpu", precision: str = "fp32", attn_implementation: str = "sdpa",
                      seed: int = data.DEFAULT_SEED, split_sizes: dict | None = None,
                      num_threads: int | None = DEFAULT_TORCH_THREADS) -> HFBackend:
    """The default backend: the committed tiny model (or ``checkpoint``) on ``device``, over the
    task its ``config.json`` names (``knobgym.task``: v1 or v2).

    ``num_threads`` sets torch's intra-op threads for the process (default
    :data:`backends.threads.DEFAULT_TORCH_THREADS`, as every backend and the CLI): the model's
    matrices are tiny, so extra threads only add synchronisation, and on a shared CPU spinning
    threads make latency erratic (measured: 20x spread between repeats with 2 threads). ``None``
    leaves torch's setting alone. The latency estimator's cache is keyed by the thread count.
    """
    if num_threads is not None:
        set_torch_threads(num_threads)
    path = Path(checkpoint) if checkpoint else CHECKPOINT_DIR
    spec = ModelSpec(model=str(path), precision=precision, device=device, attn_implementation=attn_implementation)
    if not isinstance(generation, GenerationSettings):
        generation = generation_settings_from_dict(generation)
    task = checkpoint_task(path)
    loaded = load_model(spec)
    return HFBackend(loaded, TinyVQATask(seed, split_sizes, task), generation=generation, name="tiny")
