"""Stopping a long session call from another thread, at the next layer boundary.

A frame of a large model can take minutes to append; a shutdown should not wait for it. Every
`Session.append_frame`, `Session.ask` and `Session.reset` takes a `cancel` callable, which the
model asks before each decoder layer and each vision-tower layer (flash_model.py); once it returns
true the call raises `Cancelled` there, and the session crops its KV cache back to where the call
started, so the context stays what it was before the call.

No torch here: the ROS node imports `Cancelled` before it loads the model.
"""
from __future__ import annotations

import contextlib
from typing import Callable

# Asked at every layer boundary of a call: True stops the call there (it raises Cancelled).
CancelCheck = Callable[[], bool]


class Cancelled(Exception):
    """A session call stopped at a layer boundary because its `cancel` check said so; the context
    is as it was before the call."""


@contextlib.contextmanager
def cancellable(model, cancel: CancelCheck | None):
    """Within the block, `model` (a FlashVLM) asks `cancel` at every layer boundary."""
    model.cancel = cancel
    try:
        yield
    finally:
        model.cancel = None
