"""The published checkpoints' real backbone and vision-tower dimensions, for replicas at full size.

`build_published(layout, out, dimensions="published")` (published.py) writes a replica with these
sizes instead of the tiny test backbone: random weights at the real shapes, for timing frame
appends and conversion on this machine (their answers mean nothing). `text_layers` keeps fewer
decoder layers where the whole model does not fit (Qwen2.5-VL-3B on a small machine).
Values from each checkpoint's config.json.
"""
from __future__ import annotations

INIT_RANGE = 0.02  # the real initializer range: random activations stay bounded over 24-36 layers

SMOLVLM_256M = (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, initializer_range=INIT_RANGE),
                dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12))
# layout -> (text config values, vision config values)
DIMENSIONS = {
    "idefics3": SMOLVLM_256M,  # HuggingFaceTB/SmolVLM-256M-Instruct
    "smolvlm": SMOLVLM_256M,  # HuggingFaceTB/SmolVLM2-256M-Video-Instruct
    "llava_onevision": (  # llava-hf/llava-onevision-qwen2-0.5b-ov-hf: Qwen2-0.5B and SigLIP so400m
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, initializer_range=INIT_RANGE),
        dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16)),
    "qwen2_5_vl": (  # Qwen/Qwen2.5-VL-3B-Instruct
        dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
             num_key_value_heads=2, initializer_range=INIT_RANGE,
             rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
        dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
             fullatt_block_indexes=[7, 15, 23, 31], initializer_range=INIT_RANGE)),
}


def sized_config(layout: str, config: dict, text_layers: int | None = None) -> dict:
    """`config` (a replica's config.json) with the published dimensions of `layout`, and
    `text_layers` decoder layers if given."""
    text, vision = DIMENSIONS[layout]
    text = dict(text, **({"num_hidden_layers": text_layers} if text_layers else {}))
    out = dict(config)
    if "text_config" in out:  # nested (SmolVLM, LLaVA-OneVision)
        out["text_config"] = {**out["text_config"], **text}
    else:  # Qwen2.5-VL's flat config
        out.update(text)
        if "max_window_layers" in out:
            out["max_window_layers"] = max(out["max_window_layers"], text["num_hidden_layers"])
    out["vision_config"] = {**out["vision_config"], **vision}
    return out
