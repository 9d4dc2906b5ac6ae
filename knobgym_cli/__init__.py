"""What ``train.py`` and ``evaluate.py`` share (the CLI plumbing; agents never import it).

- :mod:`knobgym_cli.errors`: one-line command-line errors and override checks.
- :mod:`knobgym_cli.runs`: run folders and the Hydra resolvers behind them.
- :mod:`knobgym_cli.build`: env, agent and evaluation budgets from a run config.
- :mod:`knobgym_cli.checkpoints`: run checkpoints (the one writer and reader are
  :func:`agents.checkpoint.write_checkpoint` / :func:`agents.checkpoint.read_checkpoint`).
- :mod:`knobgym_cli.training`: the :class:`~agents.base.FitHooks` a training run plugs into an
  agent's ``fit`` (validation, checkpoints, TensorBoard, progress bar).
- :mod:`knobgym_cli.report`: comparing agents and writing ``report.md`` / ``report.json`` / ``pareto.png``.
- :mod:`knobgym_cli.versions`: the version record of a run.
- :mod:`knobgym_cli.budgets`: ``budget=auto`` / ``budgets=auto`` and out-of-range warnings.
- :mod:`knobgym_cli.logs`: the run log (``<run>/train.log``) and one-line warnings.
- :mod:`knobgym_cli.progress`: the CLI's progress displays (tqdm on a terminal, plain lines otherwise)
  and phase messages.
- :mod:`knobgym_cli.plots`: ``pareto.png``, a panel per budget.
- :mod:`knobgym_cli.margin`: the trained agent's margin over the best baseline with its paired
  bootstrap 95% interval, the figures the verdict says.
- :mod:`knobgym_cli.summary`: the closing summary (the verdict's words), the chosen-checkpoint record, report history and
  relative paths.
"""
