"""The deployable form of a trained run: :class:`Controller` answers requests under a latency budget.

Per request it does what one episode does, without labels or reward: the policy picks the stage-1
knobs (the vision tier) from the input and the budget, stage 1 runs, the policy picks the rest (MoE
top-k, depth) from what stage 1 produced, the rest of the model runs, and the answer comes back
with the knobs, the latency the estimator predicted for them on this input and the measured wall
clock (:class:`Answer`). Each stage's choice passes the budget guard (:mod:`serving.guard`): a
configuration the estimator bounds over the budget is replaced when one within it exists.

>>> from serving import Controller
>>> controller = Controller.from_run("runs/MultiKnob-v0/grpo/<timestamp>")   # checkpoint="best"
>>> controller(image=pixels, question="what color is the circle?", budget="60ms").answer

A run folder is data: the agent is resolved from the registry by the name its checkpoint records
(nothing named in the folder is imported), the checkpoint is read as safetensors + JSON, and the
only paths opened are the folder's fixed ``checkpoints/<best|latest>.safetensors`` and
``baselines/static.safetensors``. The run's ``estimator`` setting (a module to import) is ignored:
latency comes from the cached estimator of (backend, this device), or the one given.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import gymnasium as gym
import numpy as np

from agents import Agent, EpisodeContext, agent_class, read_checkpoint
from backends.base import Sample
from envs.budget import Budget
from serving.guard import BudgetGuard

#: the ``Sample.split`` of served requests (never a data split: memos keyed by split cannot collide)
REQUEST_SPLIT = "request"
CHECKPOINTS = ("best", "latest")
STATIC_FILE = "static.safetensors"  #: the run's calibrated static, under baselines/


class ControllerError(ValueError):
    """A run folder, checkpoint or backend the controller cannot serve; names it and what is accepted."""


@dataclass(frozen=True)
class Request:
    """One request: a question (and an image for a vision model), optionally its budget and references.

    Args:
        question: the question text.
        image: ``HxWx3`` uint8 pixels (``None`` for a text-only model).
        budget: a latency budget in any single form :meth:`envs.budget.Budget.parse` accepts
            (``60ms``, ``0.06s``, ``60``); ``None``: the controller's default budget.
        answers: reference answers, when known (only to report a score; the policy never sees them).
        question_type: the data's question type, when it has one of the backend's types (an input feature).
        id: the caller's id, returned with the answer.
    """

    question: str
    image: np.ndarray | None = None
    budget: Any = None
    answers: tuple[str, ...] = ()
    question_type: str | None = None
    id: Any = None


@dataclass
class Answer:
    """What the controller returns for one request.

    ``predicted_ms``: the estimator's latency of the chosen knobs on this input before it ran (what
    the policy relied on); ``estimated_ms``: the estimator's latency with the run's actual token
    counts (what an env charges); ``measured_ms``: the wall clock of the whole request (policy and
    model); ``model_ms``: the backend's own timing of the model stages. ``within_budget`` compares
    ``measured_ms`` with the budget. ``score`` is ``None`` unless the request carried answers.
    ``guard`` is what the budget guard did (:mod:`serving.guard`: ``kept``, ``replaced`` or
    ``fallback``; ``None`` when the controller serves unguarded).
    """

    id: Any
    answer: str
    knobs: dict
    budget_ms: float
    predicted_ms: float
    estimated_ms: float
    measured_ms: float
    model_ms: float
    within_budget: bool
    score: float | None = None
    warning: str | None = None
    guard: str | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("score",)}


def parse_request_budget(budget: Any) -> float:
    """One budget in ms (the request boundary: a range or a bad value is a ``ValueError`` naming it)."""
    parsed = Budget.parse(budget)
    if parsed.is_range:
        raise ValueError(f"budget {budget!r} is a range; accepted: one budget per request, e.g. 60ms")
    return parsed.fixed_ms


class _RequestView(gym.Env):
    """The :class:`~envs.protocols.GroupEnv` side of the requests in flight, for agents that read
    their context (GRPO's latency features, greedy, grpo_lm): sample ids are request ids; the
    observations and estimates are the run's env's, computed on the request's own input.
    There are no labels, so :meth:`evaluate_group` refuses."""

    def __init__(self, env):
        self.env = env
        self.observation_space, self.action_space = env.observation_space, env.action_space
        self.budget = env.budget
        self.trajectory_nvec, self.stage_heads = env.trajectory_nvec, env.stage_heads
        self.requests: dict[int, Sample] = {}
        self.states: dict[int, Any] = {}
        # Fixed per env; attributes, not properties: agents check the GroupEnv protocol on every act,
        # and that check reads every member (BENCHMARKS.md, "Serving").
        self.achievable_range_ms: tuple[float, float] = env.achievable_range_ms
        self.suggested_budget_ms: float = env.suggested_budget_ms

    def num_samples(self, split: str) -> int:
        return len(self.requests)

    def stage_observation(self, sample_id: int, budget_ms: float, split: str, stage: int, trajectory=None):
        return self.env.request_observation(self.requests[sample_id], budget_ms, stage, self.states.get(sample_id))

    def estimated_latency_ms(self, sample_id: int, trajectories, split: str | None = None) -> np.ndarray:
        return self.env.request_latency_ms(self.requests[sample_id], trajectories)

    def evaluate_group(self, sample_id, budget_ms, trajectories, split=None):
        raise ValueError("a served request has no labels and no reward; accepted: an agent that acts from its "
                         "observation and latency estimates (every trainable agent)")

    def to_env_action(self, trajectory, stage: int = 0):
        return self.env.to_env_action(trajectory, stage)

    def provenance(self) -> dict:
        return self.env.provenance()



class Controller:
    """A frozen policy and the backend it configures, answering requests under latency budgets.

    Build one with :meth:`from_run`; call it with ``image=``, ``question=``, ``budget=`` for one
    :class:`Answer`, or :meth:`batch` with :class:`Request` objects. One model serves one request at
    a time (calls from several threads are serialised), so the measured latency is one request's.

    Args:
        env: the run's env (built internally by :meth:`from_run`): the knob space, observations and
            latency estimator; the controller never steps it and computes no reward.
        agent: the frozen agent (any trainable agent: grpo, grpo_lm, ppo, bandit, static, greedy).
        budget: the default budget of requests that give none (default: the env's budget, its
            middle for a range).
        guard: the budget guard (:class:`serving.guard.BudgetGuard`): ``True`` (default) one whose
            fallback is the configuration with the lowest bound, or a guard (e.g. with the run's
            calibrated static as fallback, as :meth:`from_run` builds), or ``None`` to serve the
            policy's choices as they are. Settable (:attr:`guard`).
    """

    def __init__(self, env: gym.Env, agent: Agent, budget: Any = None, *, source: dict | None = None,
                 guard: BudgetGuard | bool | None = True):
        base = env.unwrapped
        if not hasattr(base, "request_observation"):
            raise ControllerError(f"env {type(base).__name__} cannot serve requests; accepted: MultiKnob-v0, "
                                  f"TokenBudget-v0 and their variants (knob envs over a vision-language backend)")
        if agent.evaluation_only:
            raise ControllerError(f"agent {agent.name!r} is evaluation only (it looks at the outcome it is scored "
                                  f"on); accepted: a trainable agent")
        self.env, self.agent = base, agent
        self.backend = base.backend
        self.view = _RequestView(base)
        b = base.budget
        self.budget_ms = parse_request_budget(budget) if budget is not None else 0.5 * (b.low_ms + b.high_ms)
        self.source = dict(source or {})
        self.guard = BudgetGuard(base) if guard is True else (guard or None)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._warned: set[float] = set()

    # ------------------------------------------------------------------------------ loading
    @staticmethod
    def check_run(run: str | Path, checkpoint: str = "best", *, backend: Any = None
                  ) -> tuple[Path, Path, dict, dict]:
        """The run folder, checkpoint path, checkpoint and run config :meth:`from_run` serves, checked
        without loading a model: the checkpoint exists, is finite and records its run config, and the
        run's backend options pass the backend's cheap check (a model or dataset path missing on this
        machine), unless ``backend`` replaces it. A command calls it first, so a bad run is one line."""
        run_dir = Path(run)
        if checkpoint not in CHECKPOINTS:
            raise ControllerError(f"checkpoint={checkpoint!r} is invalid; accepted: {', '.join(CHECKPOINTS)}")
        ckpt_path = run_dir / "checkpoints" / f"{checkpoint}.safetensors"
        if not run_dir.is_dir() or not ckpt_path.is_file():
            raise ControllerError(f"run {str(run_dir)!r} has no checkpoints/{ckpt_path.name}; accepted: a run folder "
                                  f"written by train.py (runs/<env>/<agent>/<timestamp>)")
        ckpt = read_checkpoint(ckpt_path)
        _check_finite(ckpt["state"], ckpt_path)
        config = ckpt["metadata"].get("config")
        if not isinstance(config, dict) or not isinstance(config.get("env"), dict) \
                or not isinstance(config.get("backend"), dict):
            raise ControllerError(f"checkpoint {str(ckpt_path)!r} records no run config (env, backend); accepted: a "
                                  f"checkpoint written by train.py")
        if backend is None:
            from knobgym_cli.build import check_run_backend

            check_run_backend(str(config["env"].get("id")), config["backend"], config["env"].get("kwargs"))
        return run_dir, ckpt_path, ckpt, config

    @classmethod
    def from_run(cls, run: str | Path, checkpoint: str = "best", *, backend: Any = None, estimator: Any = None,
                 budget: Any = None, agent: Agent | None = None, guard: str | None = "truncate") -> "Controller":
        """The controller of run folder ``run`` (``runs/<env>/<agent>/<timestamp>``).

        Args:
            checkpoint: ``best`` (default) or ``latest``.
            backend: another backend with the same knob space and observation shape (a name, a
                dict with ``name`` and options, or a loaded backend); default: the run's.
            estimator: a latency estimator (a :class:`latency_model.LatencyEstimator` or the path of
                one saved as JSON): the device the controller serves on, when it is not this one's
                cached estimator (see "Moving a controller to another device" in the README).
            budget: the default budget (default: the run's).
            agent: a fitted agent to serve instead of the checkpoint's (the run's env is still used).
            guard: serve through the budget guard (:class:`serving.guard.BudgetGuard`) reading the
                answer's unknown length as ``truncate`` (default: priced at the expected length, cut
                where the budget ends), ``expected`` or ``every`` (up to the generation cap), with the
                static configuration the run calibrated (``baselines/static.safetensors``) as its
                fallback when the run has one; ``None``: unguarded.
        """
        run_dir, ckpt_path, ckpt, config = cls.check_run(run, checkpoint, backend=backend)
        env = build_env(config, backend=backend, estimator=estimator)
        from knobgym_cli.checkpoints import check_checkpoint_matches

        check_checkpoint_matches(ckpt, env, ckpt_path)
        if agent is None:
            cls_ = agent_class(str(ckpt["agent"]))  # the registry, by name: nothing named in the run is imported
            if cls_.evaluation_only:
                raise ControllerError(f"checkpoint {str(ckpt_path)!r} holds the evaluation-only {cls_.name!r} agent")
            agent = cls_.restore(env, ckpt["state"]).freeze()
        source = {"run": str(run_dir), "checkpoint": ckpt_path.name, "agent": agent.name, "env": ckpt["env_id"],
                  "step": ckpt["metadata"].get("step"), "run_budget": str(config.get("budget"))}
        if guard is not None:
            guard = BudgetGuard(env.unwrapped, run_static(env, run_dir), answer_lengths=guard)
        return cls(env, agent, budget, source=source, guard=guard)

    # ------------------------------------------------------------------------------ serving
    @property
    def achievable_range_ms(self) -> tuple[float, float]:
        """The estimated latency of the cheapest and the most expensive configuration on typical inputs."""
        return self.env.achievable_range_ms

    def range_warning(self, budget_ms: float) -> str | None:
        """A one-line warning when ``budget_ms`` lies outside :attr:`achievable_range_ms`, else ``None``."""
        lo, hi = self.achievable_range_ms
        if lo <= budget_ms <= hi:
            return None
        where = "below the cheapest configuration's latency" if budget_ms < lo else \
            "above the most expensive configuration's latency (it never binds)"
        return (f"budget {budget_ms:g}ms is {where}: the achievable range on this backend and device is "
                f"{lo:.1f}ms..{hi:.1f}ms")

    def __call__(self, image: np.ndarray | None = None, question: str = "", budget: Any = None,
                 **request: Any) -> Answer:
        """The :class:`Answer` to one request (``answers``, ``question_type``, ``id`` as in :class:`Request`)."""
        return self.answer(Request(question=question, image=image, budget=budget, **request))

    def batch(self, requests: Iterable[Request], progress=None) -> list[Answer]:
        """The answers to ``requests``, in order; ``progress`` (optional) is called once per answer."""
        out = []
        for request in requests:
            out.append(self.answer(request))
            if progress is not None:
                progress(out[-1])
        return out

    def answer(self, request: Request) -> Answer:
        """Serve one :class:`Request` (see the module docstring for what runs)."""
        if not isinstance(request.question, str) or not request.question.strip():
            raise ValueError(f"question={request.question!r} is invalid; accepted: a non-empty string")
        budget_ms = self.budget_ms if request.budget is None else parse_request_budget(request.budget)
        warning = self.range_warning(budget_ms)
        if warning is not None and budget_ms not in self._warned:
            self._warned.add(budget_ms)
            warnings.warn(warning, stacklevel=2)
        sample = self._sample(request)
        with self._lock:
            start = time.perf_counter()
            knobs, trajectory, outcome, guarded = self._run(sample, budget_ms)
            measured_ms = (time.perf_counter() - start) * 1e3
            predicted = float(self.env.request_latency_ms(sample, [trajectory])[0])
            estimated = float(self.env.latency.predict_ms([outcome.knobs], [outcome.token_counts])[0])
        return Answer(id=request.id, answer=outcome.answer, knobs=outcome.knobs.as_dict(), budget_ms=budget_ms,
                      predicted_ms=predicted, estimated_ms=estimated, measured_ms=measured_ms,
                      model_ms=float(outcome.measured_ms), within_budget=measured_ms <= budget_ms,
                      score=float(outcome.score) if request.answers else None, warning=warning, guard=guarded)

    def _sample(self, request: Request) -> Sample:
        space = self.env.space
        if space.has_vision and request.image is None:
            raise ValueError("the request has no image; accepted: an image (this model has a vision tower)")
        image = None
        if request.image is not None:
            image = np.asarray(request.image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
                raise ValueError(f"image of shape {image.shape} and dtype {image.dtype} is invalid; accepted: "
                                 f"HxWx3 uint8 pixels")
        types = self.env.question_types
        qtype = types.index(request.question_type) if request.question_type in types else -1
        answers = [str(a) for a in request.answers]
        reference = max(set(answers), key=answers.count) if answers else None
        return Sample(sample_id=next(self._ids), split=REQUEST_SPLIT, question=request.question, reference=reference,
                      image=image, question_type=qtype, meta={"answers": answers})

    def _run(self, sample: Sample, budget_ms: float):
        """One episode's decisions and model runs on ``sample``: ``(knobs, trajectory, outcome, guard)``
        (``guard``: what the budget guard did, ``None`` unguarded)."""
        env, view, rid = self.env, self.view, sample.sample_id
        plan = self.guard.plan(sample, budget_ms) if self.guard is not None else None
        view.requests[rid] = sample
        try:
            trajectory = np.zeros(len(env.trajectory_nvec), dtype=np.int64)
            if plan is not None and plan.fallback is not None:  # nothing admissible: the policy is not asked
                trajectory[:], plan.outcome = plan.fallback, "fallback"
            state = None
            for stage, heads in enumerate(env.stage_heads):
                if stage > 0 and state is None:  # the earlier stages chose the tier (and token budget): stage 1 runs
                    chosen = env.action_to_knobs(env.to_env_action(trajectory))
                    state = view.states[rid] = self.backend.run_stage1(sample, chosen.tier, chosen.token_budget)
                if plan is not None and plan.fallback is not None:
                    continue
                obs = env.request_observation(sample, budget_ms, stage, state)
                context = EpisodeContext(view, rid, budget_ms, REQUEST_SPLIT, stage,
                                         None if stage == 0 else tuple(int(v) for v in trajectory))
                action = np.asarray(self.agent.act(obs, context), dtype=np.int64).reshape(-1)
                trajectory[list(heads)] = action[list(heads)]  # agents return whole trajectory vectors
                if plan is not None:
                    earlier = [h for s in env.stage_heads[:stage] for h in s]
                    trajectory = plan.check(trajectory, list(heads), earlier)
            knobs = env.space.resolve(env.action_to_knobs(env.to_env_action(trajectory)))
            if state is None:  # a one-stage env (TokenBudget-v0): both model stages run now
                state = self.backend.run_stage1(sample, knobs.tier, knobs.token_budget)
            cap = None if plan is None else plan.answer_cap(trajectory)
            # the budget ends the answer, not the configuration
            with contextlib.nullcontext() if cap is None else self.backend.generation_capped(cap):
                outcome = self.backend.run_stage2(state, knobs)
            return knobs, trajectory, outcome, None if plan is None else plan.outcome
        finally:
            view.requests.pop(rid, None)
            view.states.pop(rid, None)


def build_env(config: dict, *, backend: Any = None, estimator: Any = None) -> gym.Env:
    """The env of a run's ``config`` (its env id, env options, backend and budget), or with another
    ``backend`` / latency ``estimator`` (an object or the path of a saved estimator JSON)."""
    import envs  # noqa: F401  (registers the env ids)
    from envs.registry import check_env_id

    env_cfg = config["env"]
    env_id = check_env_id(str(env_cfg.get("id")))
    if isinstance(estimator, (str, Path)):
        from latency_model import LatencyEstimator

        estimator = LatencyEstimator.load(estimator)
    kwargs = dict(env_cfg.get("kwargs") or {})
    backend_spec = backend if backend is not None else dict(config["backend"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the run's budget vs this device: said per request instead
        env = gym.make(env_id, budget=config.get("budget", "120ms"), backend=backend_spec, estimator=estimator,
                       **kwargs)
    return env


def _check_finite(state: Any, path: Path) -> None:
    """Refuse a checkpoint whose weights hold a NaN or an infinity (a policy that cannot act sensibly):
    the checkpoint format's own check (:func:`agents.checkpoint.check_finite`), as a ControllerError."""
    from agents.checkpoint import NonFiniteError, check_finite

    try:
        check_finite(state, f"checkpoint {str(path)!r} holds non-finite weights")
    except NonFiniteError as error:
        raise ControllerError(str(error)) from None


def calibrated_static(controller: Controller, run: str | Path, budgets_ms: Iterable[float]) -> tuple[Controller, list[str]]:
    """The static configuration the run calibrated at ``budgets_ms``, as a controller on the same model.

    Read from the run's ``baselines/static.safetensors`` (data only); a budget the run did not
    calibrate at (none within 1%) is calibrated here the way the run does (the static agent's
    calibration split and samples, with this controller's latency estimator). Returns the
    controller and notes saying which budgets were calibrated where.
    """
    env = controller.env
    notes = []
    static = run_static(env, run)
    if static is None:
        static = agent_class("static").from_env(env)
        notes.append(f"the run has no baselines/{STATIC_FILE}: static calibrated here")
    budgets = sorted({float(b) for b in budgets_ms})
    missing = [b for b in budgets if not any(abs(np.log(c / b)) < 0.01 for c in static.table)]
    if missing:
        from agents import eval_sample_ids

        ids = eval_sample_ids(env, static.calibration_split, static.calibration_samples)
        static.calibrate(env, missing, ids, static.calibration_split)
        notes.append(f"static calibrated here at {', '.join(f'{b:g}ms' for b in missing)} ({len(ids)} "
                     f"{static.calibration_split} samples; the run calibrated at "
                     f"{', '.join(f'{b:g}ms' for b in sorted(static.table) if b not in missing) or 'no budget'})")
    else:
        notes.append(f"static: the run's calibration at {', '.join(f'{b:g}ms' for b in budgets)}")
    return Controller(env, static, controller.budget_ms, source={**controller.source, "agent": "static"},
                      guard=None), notes


def run_static(env: gym.Env, run: str | Path) -> Agent | None:
    """The static agent the run calibrated (``baselines/static.safetensors``, read as data), or ``None``."""
    path = Path(run) / "baselines" / STATIC_FILE
    if not path.is_file():
        return None
    return agent_class("static").restore(env, read_checkpoint(path, agent="static")["state"])
