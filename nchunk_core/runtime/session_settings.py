"""How a session's settings change: `Session.update` checks the new values at once and keeps them
pending; the next call puts them in force (`_apply_pending`), a new frame_tokens only at a frame.

`SessionSettings` is a part of `Session` (session.py), which derives from it; it keeps no state of
its own. It works on the Session's state, all set up in `Session.__init__`: the settings in force
(`_cfg`), the pending changes (`_pending`, under `_pending_lock`), the adapter and its prompt prefix
(`adapter`, `_prefix`, `_prefixed`, `_relayout`, `_frames`), the decoding settings (`decoding`,
`stop_ids`, read from `store`), the kept frames (`_kept`), the flash model (`_flash`: selection, row
cache), the model's positions (`max_positions`, `_frame_tokens`: the longest frame so far) and `_log`.
"""
from __future__ import annotations

import collections
import dataclasses

import torch

from nchunk_core.runtime.calibrated_mode import frame_mode_note
from nchunk_core.runtime.config import (MAX_NEW_TOKENS_LIMIT, SessionConfig, check_budget_ms, check_selection,
                                        frame_tokens_value, positive_int, ram_budget_value)
from nchunk_core.runtime.decoding import DecodingSettings
from nchunk_core.runtime.select import SelectionSettings, check_cache_policy

QUESTION_TEMPLATE_TOKENS = 16  # positions kept for the question prompt's template beyond max_question_tokens


class SessionSettings:
    """The settings methods of Session (see the module docstring)."""

    @property
    def config(self) -> SessionConfig:
        """A copy of the settings in force (pending updates included)."""
        with self._pending_lock:
            return dataclasses.replace(self._cfg, **self._pending)

    @property
    def max_answer_tokens(self) -> int:
        """The longest answer the model's positions hold beside the prompt prefix, the longest frame so
        far and the longest question (max_question_tokens and its template): max_new_tokens' limit."""
        room = (self.max_positions - self._prefix.num_tokens - self._frame_tokens
                - self._cfg.max_question_tokens - QUESTION_TEMPLATE_TOKENS)
        return max(1, min(MAX_NEW_TOKENS_LIMIT, room))

    def update(self, selection: SelectionSettings | None = None, max_frames: int | None = None,
               ram_budget_mib: float | None = None, max_new_tokens: int | None = None,
               frame_budget_ms: float | None = None, cache_policy: str | None = None, frame_tokens=None,
               decoding: str | None = None) -> None:
        """Change the selection settings, max_frames, the row cache's RAM budget or policy,
        max_new_tokens, frame_budget_ms or decoding, applied at the start of the next call (a new RAM
        budget or policy re-reads the cached rows then), or frame_tokens, applied at the next frame
        (session.py's module docstring).

        None leaves a setting unchanged. A refused value raises ValueError and changes nothing. A
        max_frames below the frames in context makes the next append rebuild the context.
        """
        change = {}
        if max_frames is not None:
            change["max_frames"] = positive_int("max_frames", max_frames)
        if max_new_tokens is not None:
            change["max_new_tokens"] = positive_int("max_new_tokens", max_new_tokens, self.max_answer_tokens)
        if selection is not None:
            change["selection"] = check_selection(selection)
        if ram_budget_mib is not None:
            change["ram_budget_mib"] = ram_budget_value(ram_budget_mib)
        if frame_budget_ms is not None:
            change["frame_budget_ms"] = check_budget_ms(frame_budget_ms)
        if frame_tokens is not None:
            self.adapter.check_frame_tokens(frame_tokens)  # a mode this model has
            change["frame_tokens"] = frame_tokens_value(frame_tokens)
        if decoding is not None:
            DecodingSettings.load(self.store.path, self.stop_ids, decoding)  # a generation config that loads
            change["decoding"] = decoding
        if cache_policy is not None:
            change["cache_policy"] = check_cache_policy(cache_policy)
        with self._pending_lock:
            self._pending.update(change)

    def _apply_pending(self, frame: bool = True) -> None:
        """Put the pending updates in force; a new frame_tokens only when a `frame` is appended."""
        with self._pending_lock:
            pending, self._pending = self._pending, {}
            if not frame and "frame_tokens" in pending:
                self._pending["frame_tokens"] = pending.pop("frame_tokens")
        old, self._cfg = self._cfg, dataclasses.replace(self._cfg, **pending)
        cfg = self._cfg
        self._flash.selection = cfg.selection  # also puts back what a budgeted frame chose
        if not pending:
            return
        if old.frame_budget_ms != cfg.frame_budget_ms:
            self._log(f"frame_budget_ms now {cfg.frame_budget_ms:g}" + (" (off)" if not cfg.frame_budget_ms else ""))
        if old.selection != cfg.selection:
            self._log(f"selection now {cfg.selection.method} at sparsity {cfg.selection.sparsity:g}")
        if (old.ram_budget_mib, old.cache_policy) != (cfg.ram_budget_mib, cfg.cache_policy):
            cache = self._flash.set_ram_budget(int(cfg.ram_budget_mib * 2**20), cfg.cache_policy)
            self._log(f"row cache now {cache.nbytes / 2**20:.1f} MiB (budget {cfg.ram_budget_mib:g} MiB, "
                      f"policy {cfg.cache_policy})")
        if old.max_frames != cfg.max_frames:
            self._kept = collections.deque(self._kept, maxlen=cfg.max_frames // 2)
            self._log(f"max_frames now {cfg.max_frames}")
        if old.decoding != cfg.decoding:
            self.decoding = DecodingSettings.load(self.store.path, self.stop_ids, cfg.decoding)
            self._log(f"decoding now {cfg.decoding}: {self.decoding.describe()}")
        if old.frame_tokens != cfg.frame_tokens:
            self._set_frame_tokens(cfg.frame_tokens)

    def _set_frame_tokens(self, value) -> None:
        """Frames from now on cost `value`; a change of prompt pieces rebuilds at this frame."""
        adapter = self.adapter.with_frame_tokens(value)
        prefix = adapter.encode_text(adapter.prompt_prefix)
        if adapter.prompt != self.adapter.prompt and self._frames:
            self._relayout = True
            self._prefixed = self._prefixed and torch.equal(prefix.input_ids, self._prefix.input_ids)
        self.adapter, self._prefix = adapter, prefix
        self._log(f"frame_tokens now {value!r}: {adapter.describe()}" + (
            "; the context is rebuilt in this mode" if self._relayout else "; frames in context keep theirs"))
        note = frame_mode_note(self.store.model_info, adapter)
        if note:
            self._log(note)
