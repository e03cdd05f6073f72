"""Which of the node's parameters follow the store's recommended settings, and adopting them.

A store may recommend sparsity, method, max_frames and max_new_tokens (`Store.recommended`,
nchunk_core/store/recommended.py). Each of those parameters that the user did not set takes the
store's value, or the node's default for a store that recommends nothing; a value the user set
always wins. "Set by the user" means given at start-up (a params file, `-p`, a launch file's
parameters: what rclpy calls the node's parameter overrides) or changed later (`ros2 param set`).
The user's values stay when the model is reloaded from another store; the others follow each new
store. The node sets the values it takes from a store as its parameters, so `ros2 param get`
shows the value in effect.
"""
from __future__ import annotations

import threading

from rclpy.parameter import Parameter

from nchunk_ros.parameters import RECOMMENDED_PARAMETERS, recommended_values


class StoreSettings:
    """The user's choices among RECOMMENDED_PARAMETERS (module docstring)."""

    def __init__(self, overridden):
        """`overridden`: the names of the parameters given at start-up (the node's parameter overrides)."""
        self._lock = threading.Lock()
        self._user_set = {name for name in RECOMMENDED_PARAMETERS if name in set(overridden)}
        self._adopting = threading.local()  # set while this thread sets the store's values

    @property
    def user_set(self) -> frozenset:
        with self._lock:
            return frozenset(self._user_set)

    def changed(self, names) -> None:
        """Parameters `names` were just set at run time: by the user, unless this thread is
        adopting a store's values."""
        if getattr(self._adopting, "active", False):
            return
        with self._lock:
            self._user_set |= set(names) & set(RECOMMENDED_PARAMETERS)

    def values_for(self, recommended) -> dict:
        """{name: value} of the parameters the user did not set, for a store recommending
        `recommended` (a Recommended, or None)."""
        return recommended_values(recommended, self.user_set)

    def adopt(self, node, values: dict):
        """Set `values` (from values_for) as `node`'s parameters, as the store's, not the user's;
        rclpy's SetParametersResult."""
        self._adopting.active = True
        try:
            return node.set_parameters_atomically([Parameter(k, value=v) for k, v in values.items()])
        finally:
            self._adopting.active = False

    def describe(self, recommended, values: dict, in_effect: dict) -> str:
        """One log line: which values came from the store (or the node's defaults) and which from the user."""
        taken = ", ".join(f"{k} {v!r}" for k, v in values.items())
        source = "from the store's recommended settings" if recommended is not None else \
            "the node's defaults (the store recommends no settings)"
        line = f"{taken}: {source}" if taken else "no setting from the store"
        user = [k for k in RECOMMENDED_PARAMETERS if k not in values]
        if user:
            line += "; set by you: " + ", ".join(f"{k} {in_effect[k]!r}" for k in user)
        return line + " (a value in the params file or given with -p wins over the store's)"
