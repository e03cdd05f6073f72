"""Decoding as the checkpoint asks: greedy, with the greedy-compatible settings of generation_config.json.

A checkpoint's generation_config.json says how its authors want it to answer. Of its settings, the
ones that keep decoding deterministic are applied by default (`decoding="checkpoint"`):

- `eos_token_id` (one id or several): decoding stops after any of them;
- `repetition_penalty`: before each token, the logit of every token id already in the context (the
  prompt, the frames' tokens, the question, the tokens generated so far) is divided by the penalty
  when positive and multiplied by it when negative, as transformers' generate() does.

Sampling settings (`do_sample` with temperature / top_k / top_p) and the other logits processors are
not applied: the answer stays deterministic (a robot asks twice, it gets the same answer); they are
listed in `DecodingSettings.ignored` for the log. Qwen2.5-VL, for one, ships do_sample with top_k 1
(greedy in effect) and a repetition penalty of 1.05. `decoding="greedy"` is plain greedy decoding
(argmax; stop ids still apply).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from nchunk_core.runtime.setting_values import decoding_value

if TYPE_CHECKING:
    from transformers import DynamicCache

# generation settings that would change a deterministic answer but are not applied (name: default)
NOT_APPLIED = {"num_beams": 1, "no_repeat_ngram_size": 0, "min_new_tokens": None, "bad_words_ids": None,
               "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
               "forced_bos_token_id": None, "forced_eos_token_id": None}


@dataclasses.dataclass(frozen=True)
class DecodingSettings:
    """How answers are decoded: stop ids and the repetition penalty (1.0: none)."""

    stop_ids: tuple[int, ...] = ()
    repetition_penalty: float = 1.0
    ignored: tuple[str, ...] = ()  # checkpoint settings not applied, as "name=value"
    mode: str = "checkpoint"

    @classmethod
    def load(cls, path, stop_ids: tuple[int, ...], decoding: str = "checkpoint") -> "DecodingSettings":
        """The settings of the checkpoint (or store) at `path` for the `decoding` mode."""
        from transformers import GenerationConfig

        decoding_value(decoding)
        file = Path(path) / "generation_config.json"
        if decoding == "greedy" or not file.is_file():
            return cls(stop_ids=tuple(stop_ids), mode=decoding)
        config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
        penalty = float(config.repetition_penalty or 1.0)
        if penalty <= 0:
            raise ValueError(f"{file}: repetition_penalty must be positive, got {penalty}")
        ignored = [f"{name}={getattr(config, name)!r}" for name, default in NOT_APPLIED.items()
                   if getattr(config, name, default) not in (default, None)]
        if config.do_sample:
            ignored.insert(0, f"do_sample (temperature={config.temperature}, top_k={config.top_k}, "
                              f"top_p={config.top_p})")
        return cls(stop_ids=tuple(stop_ids), repetition_penalty=penalty, ignored=tuple(ignored), mode=decoding)

    def describe(self) -> str:
        text = "greedy" + (f" with repetition_penalty {self.repetition_penalty:g}"
                           if self.repetition_penalty != 1.0 else "")
        text += f", stop ids {list(self.stop_ids)}"
        if self.ignored:
            text += f"; not applied (answers stay deterministic): {', '.join(self.ignored)}"
        return text


def penalise_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [1, V] with the logits of the token ids marked in `seen` (bool [V]) penalised."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen[None], penalised, logits)


@torch.no_grad()
def greedy_decode(
    adapter,
    logits: torch.Tensor,
    cache: "DynamicCache",
    next_position: int,
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = (),
    should_stop: Callable[[], bool] | None = None,
    *,
    repetition_penalty: float = 1.0,
    context_ids: torch.Tensor | None = None,
    on_token: Callable[[list[int]], None] | None = None,
) -> tuple[list[int], int]:
    """Greedy tokens after the context in `cache` (logits [1, V] of its last token).

    Each generated token but the last is appended as a one-token text chunk; stops after a stop id
    (included), after max_new_tokens, or when `should_stop()`, asked before each new token, is true
    (a deadline, a cancelled request: the tokens so far are returned). With a repetition penalty,
    `context_ids` (int64, any shape) are the token ids of the context in `cache`. `on_token(tokens so
    far)` is called after each new token, before the next forward pass. The last token is not in the
    cache yet: a caller that continues the conversation appends it (with whatever
    follows). Returns (token ids, next free position).
    """
    tokens: list[int] = []
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)  # [V]
        if context_ids is not None:
            seen[context_ids.reshape(-1).to(logits.device)] = True
    for _ in range(max_new_tokens):
        if should_stop is not None and should_stop():
            break
        if seen is not None:
            logits = penalise_repetition(logits, seen, repetition_penalty)
        token = int(logits[0].argmax())
        tokens.append(token)
        if seen is not None:
            seen[token] = True
        if on_token is not None:
            on_token(tokens)
        if token in stop_ids or len(tokens) == max_new_tokens:
            break
        logits, next_position = adapter.append_text([token], cache, next_position)
    return tokens, next_position
