"""The KV envs' action grids: which values each policy knob takes in an env.

A policy's fields are its knobs; the values an RL env offers for each (the grid) are the env's
business, chosen here: per knob, the ``knob_grid`` given to the env, else the shipped policies'
:data:`ACTION_GRIDS`, else :data:`DEFAULT_KNOB_GRID`, else the field's default alone (fixed). A new
policy needs no entry here: its ``window`` and ``compress_every`` get the default values.
"""

from __future__ import annotations

import dataclasses
import itertools

from backends.kv.policies import KVPolicy

DEFAULT_KNOB_GRID: dict[str, tuple] = {"window": (32, 64, 128, 256), "compress_every": (1, 8, 32, 64)}
ACTION_GRIDS: dict[str, dict[str, tuple]] = {
    "SinkWindow": {"n_sink": (0, 4, 8), "window": (32, 64, 128, 256), "compress_every": (1, 8, 32, 64)},
    "KeyNormWindow": {"window": (32, 64, 128, 256), "n_recent": (8, 32), "compress_every": (1, 8, 32, 64)},
}


def kv_action_grid(policy_class: type[KVPolicy], knob_grid: dict | None = None) -> dict[str, tuple]:
    """The action grid of ``policy_class``: knob name -> values, every combination a valid policy.

    Per knob, first match wins: ``knob_grid``, :data:`ACTION_GRIDS` of the policy,
    :data:`DEFAULT_KNOB_GRID` (``window`` and ``compress_every``), else the field's default alone
    (the knob is then fixed). Order (the action's element order): the policy's grid's
    (:data:`ACTION_GRIDS`, else :data:`DEFAULT_KNOB_GRID`), then field order, whatever the order
    of ``knob_grid``'s keys (so a grid read back from a saved config gives the same layout).
    """
    given = dict(knob_grid or {})
    # An option that is not a knob (metadata knob=False, e.g. rope_positions) joins the grid only when named.
    fields = [f for f in dataclasses.fields(policy_class) if f.init and (f.metadata.get("knob", True) or f.name in given)]
    names = [f.name for f in fields]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"knob_grid names unknown knob(s) {unknown} of {policy_class.__name__}; accepted: {names}")
    base = dict(ACTION_GRIDS.get(policy_class.policy_name(), {}))
    base.update({name: values for name, values in DEFAULT_KNOB_GRID.items() if name not in base})
    # The order never follows ``knob_grid``'s own: a grid that went through a config file (keys
    # sorted) must give the same action layout as the one the run was trained with.
    order = [n for n in base if n in names] + [n for n in names if n not in base]
    grid = {}
    for field in fields:
        values = given.get(field.name, base.get(field.name))
        if values is None:
            if field.default is dataclasses.MISSING:
                raise ValueError(f"{policy_class.__name__}.{field.name} has no default and no grid; accepted: "
                                 f"knob_grid={{'{field.name}': (values, ...)}}")
            values = (field.default,)
        values = tuple(values)
        if not values:
            raise ValueError(f"knob_grid[{field.name!r}] is empty; accepted: at least one value")
        grid[field.name] = values
    grid = {name: grid[name] for name in order}
    for combination in itertools.product(*grid.values()):
        try:
            policy_class(**dict(zip(grid, combination)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"the action grid of {policy_class.__name__} contains an invalid combination "
                             f"{dict(zip(grid, combination))}: {error}") from None
    return grid
