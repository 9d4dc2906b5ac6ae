"""Ray is optional: without it, ``rollout=ray`` is one error line (exit 2, no run folder) and the
library says how to install it; ``rollout=local`` (the default) never imports it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from executors.ray import RayUnavailable, require_ray

REPO = Path(__file__).resolve().parent.parent
#: run train.py as if Ray were not installed (a None entry in sys.modules makes ``import ray`` fail)
WITHOUT_RAY = ("import runpy, sys; sys.modules['ray'] = None; sys.argv = ['train.py', *sys.argv[1:]]; "
               "runpy.run_path('train.py', run_name='__main__')")


def test_require_ray_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayUnavailable, match=r"pip install -e '\.\[ray\]'"):
        require_ray()


def test_rollout_ray_without_ray_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run([sys.executable, "-c", WITHOUT_RAY, "rollout=ray", "rollout.workers=2",
                             f"runs_dir={tmp_path / 'runs'}"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: rollout=ray needs Ray, which is not installed; install with pip install -e '.[ray]'"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, accepted", [("rollout=dask", "accepted: local, ray"),
                                                ("rollout.workers=0", "an integer >= 1"),
                                                ("rollout.workers=two", "an integer >= 1"),
                                                ("rollout.workers=2", "needs rollout=ray")])
def test_bad_rollout_overrides_are_one_line(override, accepted):
    from knobgym_cli.errors import UsageError, check_overrides

    with pytest.raises(UsageError, match=accepted):
        check_overrides([override], "config")


def test_rollout_workers_with_rollout_ray_or_one_worker_is_accepted():
    from knobgym_cli.errors import check_overrides

    check_overrides(["rollout=ray", "rollout.workers=2"], "config")
    check_overrides(["rollout.workers=1"], "config")
