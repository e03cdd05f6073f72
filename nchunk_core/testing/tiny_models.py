"""Tiny random-init vision-language models built locally, for tests and the offline demo.

`build_tiny_vlm(arch, out_dir)` builds a real transformers architecture from a config (a language
backbone of 2 layers × 64 hidden, a vision tower of 2 layers × 32 hidden, under 0.2 M parameters),
a tokenizer made here with the `tokenizers` library, an image processor, and a processor; it saves
them with `save_pretrained` so that they reload offline with
`AutoConfig / AutoModelForImageTextToText / AutoProcessor.from_pretrained(out_dir)` once this module
has been imported (it imports nchunk_core.runtime.processors, which registers the processors).

Tokenizer: byte-level BPE without merges (every byte is a token, so any text encodes and decodes
exactly) plus the special tokens that the architecture's processor and prompts use.

Processors: the image-only subclasses of nchunk_core.runtime.processors (they work without
torchvision), registered with `AutoProcessor` when that module is imported.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from nchunk_core.runtime.processors import (
    ImageOnlyLlavaOnevisionProcessor,
    ImageOnlyQwen2_5_VLProcessor,
    ImageOnlySmolVLMProcessor,
)

ARCHS = ("llava_onevision", "qwen2_5_vl", "smolvlm")

# Language backbone shared by all architectures: 2 layers, 4 query heads of 16, 2 KV heads.
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    # Wider than the real 0.02 so that random logits have clear winners (greedy tests need margins).
    initializer_range=0.2,
)
VOCAB_SIZE = 384  # ≥ 256 byte tokens + the specials of any architecture
FRAME_HW = (48, 64)  # default test frame: 4:3 like a camera, small enough for few visual tokens

_CHAT = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPECIAL_TOKENS = {
    "qwen2_5_vl": _CHAT + ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "llava_onevision": _CHAT + ["<image>", "<video>"],
    "smolvlm": _CHAT
    + ["<end_of_utterance>", "<fake_token_around_image>", "<global-img>", "<image>", "<video>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)],
}
# (bos, eos, pad) as in the real checkpoints' tokenizers.
ROLE_TOKENS = {
    "qwen2_5_vl": (None, "<|im_end|>", "<|endoftext|>"),
    "llava_onevision": (None, "<|im_end|>", "<|endoftext|>"),
    "smolvlm": ("<|im_start|>", "<end_of_utterance>", "<|im_end|>"),
}


# ---------------------------------------------------------------- tokenizer


def build_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens (ids 0–255), then the architecture's special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for bytes
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS[arch])
    bos, eos, pad = ROLE_TOKENS[arch]
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    if len(out) > VOCAB_SIZE:
        raise ValueError(f"{arch}: {len(out)} tokens exceed the model vocabulary of {VOCAB_SIZE}")
    return out


# ---------------------------------------------------------------- per-architecture builders


def _text_config(tok, **extra) -> dict:
    """The tiny language backbone shared by every architecture, with the tokenizer's special ids."""
    return dict(**TEXT, vocab_size=VOCAB_SIZE, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, **extra)


def _qwen2_5_vl(tok):
    ids = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=_text_config(
            tok,
            # mrope splits the 8 rotary frequencies (head_dim / 2) into t, h, w sections.
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=TEXT["hidden_size"],
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=32,  # windows of 2×2 merged tokens
            fullatt_block_indexes=[1],
            initializer_range=0.2,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    # Pixels are resized to multiples of patch × merge = 16; 48×64 gives a 6×8 patch grid → 12 tokens.
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=8,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64},  # min / max pixels
    )
    processor = ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok)
    return Qwen2_5_VLForConditionalGeneration, config, processor


def _llava_onevision(tok):
    ids = tok.convert_tokens_to_ids
    pinpoints = [[32, 32], [32, 64], [64, 32]]  # anyres tiles of the 32-px vision input
    config = LlavaOnevisionConfig(
        text_config=_text_config(tok, model_type="qwen2"),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,  # 4×4 = 16 patches per tile
            vision_use_head=False,
        ),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    processor = ImageOnlyLlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )
    return LlavaOnevisionForConditionalGeneration, config, processor


def _smolvlm(tok):
    config = SmolVLMConfig(
        text_config=_text_config(tok, model_type="llama"),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,  # 16 patches per tile, pixel-shuffled by scale_factor 2 → 4 tokens
        ),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    # Frames are resized to a longest edge of 64 and split into 32-px tiles plus one global tile.
    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    processor = ImageOnlySmolVLMProcessor(image_processor=image_processor, tokenizer=tok, image_seq_len=4)
    return SmolVLMForConditionalGeneration, config, processor


_BUILDERS = {"qwen2_5_vl": _qwen2_5_vl, "llava_onevision": _llava_onevision, "smolvlm": _smolvlm}


# ---------------------------------------------------------------- public API


def build_tiny_vlm(arch: str, out_dir, seed: int = 0) -> Path:
    """Build a tiny random-init `arch` model with tokenizer and processor, save all to `out_dir`."""
    if arch not in _BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    out_dir = Path(out_dir)
    tok = build_tokenizer(arch)
    model_class, config, processor = _BUILDERS[arch](tok)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def load_tiny_vlm(out_dir):
    """Reload a saved tiny model offline: (model in eval mode, processor)."""
    model = AutoModelForImageTextToText.from_pretrained(out_dir, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(out_dir, local_files_only=True)
    return model, processor


def make_frame(height: int = FRAME_HW[0], width: int = FRAME_HW[1], seed: int = 0) -> np.ndarray:
    """Deterministic RGB frame [H, W, 3] uint8: colour gradients plus a seeded bright rectangle."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    rng = np.random.default_rng(seed)
    y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
    img[y0 : y0 + height // 3, x0 : x0 + width // 3] = rng.integers(0, 256, size=3)
    return img.astype(np.uint8)
