"""KV cache surgery shared by the session and calibration: crop a cache, copy its first tokens."""
from __future__ import annotations

from transformers import DynamicCache


def truncate_cache(cache: DynamicCache, length: int) -> None:
    """Drop every cached token after the first `length`, in every layer."""
    for layer in cache.layers:
        n = layer.get_seq_length()
        if n > length:
            layer.crop(length - n)


def copy_cache(cache: DynamicCache, length: int | None = None) -> DynamicCache:
    """A new cache holding a copy of the first `length` tokens (all of them: None) of `cache`."""
    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        n = layer.keys.shape[-2] if length is None else length
        out.update(layer.keys[..., :n, :].clone(), layer.values[..., :n, :].clone(), i)
    return out
