"""Frame appending: per-architecture adapters that grow a VLM's KV cache one chunk at a time.

A chunk is one piece of context: a camera frame (its prompt text with the image's visual tokens) or
plain text (a question, one generated token). `append` runs the full model forward on the chunk
against a `DynamicCache` holding everything appended so far, with position ids computed here, and
returns the logits of the chunk's last token. Appending frame 1, frame 2, …, question chunk by chunk
gives the same logits as one forward of the whole sequence (the test checks ≤ 1e-4; it is ~1e-6).

Positions: `next_position` is the first position id the next chunk may use. For 1-D RoPE models
(LLaVA-OneVision, SmolVLM) it equals the cache length. Qwen2.5-VL uses 3-D mrope: a frame's visual
tokens take (t, h, w) positions from `get_rope_index`, and the next free position afterwards is
max + 1, which is *less* than the cache length; so the adapter tracks it, never the model (the
model's own `rope_deltas` bookkeeping assumes a single vision prefill and is bypassed by always
passing `position_ids`).

The adapter also names the decoder's projections for the flash runtime, which swaps each of them
for a streamed module: `projection_groups(model)` lists, per decoder layer, the projections sharing
one input: {"attn_in": [q, k, v], "attn_out": [o], "mlp_in": [gate, up], "mlp_out": [down]}, as
module paths relative to the model (`model.get_submodule(path)`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import DynamicCache

PROJECTIONS = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}


@dataclasses.dataclass
class Chunk:
    """One piece of context to append: token ids plus the vision inputs of its image (if any)."""

    input_ids: torch.Tensor  # [1, T] int64
    vision: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # forward kwargs; {} for text
    num_visual_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


class VLMAdapter:
    """Architecture-specific glue between frames / text and a transformers VLM with a KV cache."""

    arch: str = ""
    layers_path: str = ""  # module path of the decoder's nn.ModuleList
    vision_keys: tuple[str, ...] = ()  # processor outputs the model forward needs for an image
    # Prompt pieces, mirroring the architecture's chat template: a conversation is
    # prompt_prefix, then one frame_prompt per frame (the image placeholder expands to visual
    # tokens), then question_prompt(question), after which the model answers.
    prompt_prefix: str = ""
    frame_prompt: str = ""
    question_template: str = "{question}"

    def __init__(self, model: nn.Module, processor=None):
        self.model = model
        self.processor = processor
        self.image_token_id = int(model.config.image_token_id)

    # ------------------------------------------------------------ structure (for the flash runtime)

    @classmethod
    def decoder_layers(cls, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(cls.layers_path)

    @classmethod
    def projection_groups(cls, model: nn.Module) -> list[dict[str, list[str]]]:
        """Per decoder layer: {group: [module paths]} of the projections that share an input."""
        n = len(cls.decoder_layers(model))
        return [
            {g: [f"{cls.layers_path}.{i}.{name}" for name in names] for g, names in PROJECTIONS.items()}
            for i in range(n)
        ]

    # ------------------------------------------------------------ encoding

    def question_prompt(self, question: str) -> str:
        return self.question_template.format(question=question)

    def encode_frame(self, image) -> Chunk:
        """A frame (PIL image or uint8 array [H, W, 3]) → its chunk: frame_prompt with visual tokens."""
        image = self._frame_image(image)
        out = self.processor(images=[image], text=[self.frame_prompt], return_tensors="pt")
        input_ids = out["input_ids"]
        vision = {k: out[k] for k in self.vision_keys if k in out}
        n_visual = int((input_ids == self.image_token_id).sum())
        return Chunk(input_ids=input_ids, vision=vision, num_visual_tokens=n_visual)

    def _frame_image(self, image) -> Image.Image:
        if self.processor is None:
            raise ValueError("encoding a frame needs the model's processor")
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if not isinstance(image, np.ndarray):
            raise TypeError(f"a frame must be a PIL image or a NumPy array, not {type(image).__name__}")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(f"a frame array must be uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}")
        return Image.fromarray(image)

    def encode_text(self, text: str) -> Chunk:
        if self.processor is None:
            raise ValueError("encode_text needs the model's processor")
        ids = self.processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return Chunk(input_ids=ids)

    # ------------------------------------------------------------ appending

    def positions(self, chunk: Chunk, next_position: int) -> tuple[torch.Tensor, int]:
        """Position ids of the chunk [1, T] starting at next_position, and the next free position."""
        t = chunk.num_tokens
        pos = torch.arange(next_position, next_position + t, device=chunk.input_ids.device)[None]
        return pos, next_position + t

    @torch.no_grad()
    def append(self, chunk: Chunk, cache: DynamicCache, next_position: int) -> tuple[torch.Tensor, int]:
        """Run the chunk through the model on top of `cache` (grown in place).

        Returns the logits of the chunk's last token [1, V] (float32) and the next free position.
        """
        if chunk.num_tokens == 0:
            raise ValueError("cannot append an empty chunk")
        chunk = self._on_model_device(chunk)
        position_ids, next_position = self.positions(chunk, next_position)
        out = self.model(
            input_ids=chunk.input_ids,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **chunk.vision,
        )
        return out.logits[:, -1].float(), next_position

    def _on_model_device(self, chunk: Chunk) -> Chunk:
        """The chunk's tensors on the model's device; pixel tensors in the model's dtype."""
        device, dtype = self.model.device, self.model.dtype
        vision = {
            k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in chunk.vision.items()
        }
        return dataclasses.replace(chunk, input_ids=chunk.input_ids.to(device), vision=vision)

    def append_text(self, text_ids, cache: DynamicCache, next_position: int) -> tuple[torch.Tensor, int]:
        """Append token ids (list, [T] or [1, T]) as a text chunk; same return as `append`."""
        ids = torch.as_tensor(text_ids, dtype=torch.long).reshape(1, -1)
        return self.append(Chunk(input_ids=ids), cache, next_position)


class LlavaOnevisionAdapter(VLMAdapter):
    """LLaVA-OneVision (SigLIP + Qwen2), 1-D positions. Two ways to turn a frame into tokens:

    - frame_mode="image": the single-image anyres path (base view + tiles + row newlines); a 384-px
      model gives 729 tokens for the base view alone, several times that with tiles.
    - frame_mode="video": the frame as a one-frame video: the base view only, 2×2 bilinear pooling of
      the patch grid, one newline (⌈27/2⌉² + 1 = 197 tokens on a 384-px model, the paper's setting).
      Pixels come from the image processor (its first tile is the whole frame resized to the vision
      input, as the video processor does), so no video processor (torchvision) is needed.
    """

    arch = "llava_onevision"
    layers_path = "model.language_model.layers"
    # batch_num_images is left out: with it = 1 the model takes the same single-image (anyres) path.
    vision_keys = ("pixel_values", "image_sizes")
    prompt_prefix = "<|im_start|>user "
    frame_prompt = "<image>\n"
    question_template = "{question}<|im_end|>\n<|im_start|>assistant\n"

    def __init__(self, model: nn.Module, processor=None, frame_mode: str = "image"):
        super().__init__(model, processor)
        if frame_mode not in ("image", "video"):
            raise ValueError(f"frame_mode must be 'image' or 'video', not {frame_mode!r}")
        self.frame_mode = frame_mode
        self.video_token_id = int(model.config.video_token_id)

    def encode_frame(self, image) -> Chunk:
        if self.frame_mode == "image":
            return super().encode_frame(image)
        image = self._frame_image(image)
        vision = self.model.config.vision_config
        side = vision.image_size
        pixels = self.processor.image_processor(
            images=[image], image_grid_pinpoints=[[side, side]], return_tensors="pt"
        )["pixel_values"][:, :1]  # [1, 1 frame, 3, side, side]: the base view
        pooled = math.ceil(side // vision.patch_size / 2)
        n_visual = pooled * pooled + 1  # pooled patch grid + one newline
        text = self.frame_prompt.replace(self.processor.image_token, self.processor.video_token * n_visual)
        ids = self.processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if int((ids == self.video_token_id).sum()) != n_visual:
            raise RuntimeError("video token does not encode to the model's video_token_id")
        return Chunk(input_ids=ids, vision={"pixel_values_videos": pixels}, num_visual_tokens=n_visual)


class Qwen2_5_VLAdapter(VLMAdapter):
    """Qwen2.5-VL: native-resolution vision tower, 3-D mrope positions tracked by the adapter."""

    arch = "qwen2_5_vl"
    layers_path = "model.language_model.layers"
    vision_keys = ("pixel_values", "image_grid_thw")
    prompt_prefix = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    frame_prompt = "<|vision_start|><|image_pad|><|vision_end|>"
    question_template = "{question}<|im_end|>\n<|im_start|>assistant\n"

    def positions(self, chunk: Chunk, next_position: int) -> tuple[torch.Tensor, int]:
        """mrope position ids [3, 1, T]: get_rope_index on the chunk alone, shifted to next_position."""
        if "image_grid_thw" not in chunk.vision:
            pos, nxt = super().positions(chunk, next_position)
            return pos[None].expand(3, -1, -1), nxt
        token_types = (chunk.input_ids == self.image_token_id).int()  # [1, T]: 1 = image, 0 = text
        pos, _ = self.model.model.get_rope_index(
            chunk.input_ids, mm_token_type_ids=token_types, image_grid_thw=chunk.vision["image_grid_thw"]
        )
        pos = pos + next_position  # [3, 1, T]
        return pos, int(pos.max()) + 1


class SmolVLMAdapter(VLMAdapter):
    """SmolVLM (SigLIP + pixel shuffle + Llama): image split into tiles + a global view, 1-D positions."""

    arch = "smolvlm"
    layers_path = "model.text_model.layers"
    vision_keys = ("pixel_values", "pixel_attention_mask")
    prompt_prefix = "<|im_start|>User:"
    frame_prompt = "<image>"
    question_template = "{question}<end_of_utterance>\nAssistant:"


ADAPTERS = {cls.arch: cls for cls in (LlavaOnevisionAdapter, Qwen2_5_VLAdapter, SmolVLMAdapter)}


def adapter_class(model_type: str) -> type[VLMAdapter]:
    if model_type not in ADAPTERS:
        known = sorted(ADAPTERS)
        raise ValueError(f"no frame-appending adapter for model type {model_type!r}; known: {known}")
    return ADAPTERS[model_type]


def adapter_for(model: nn.Module, processor=None, **options) -> VLMAdapter:
    """The adapter for a loaded VLM (by `model.config.model_type`); options go to its constructor."""
    return adapter_class(model.config.model_type)(model, processor, **options)


@torch.no_grad()
def greedy_decode(
    adapter: VLMAdapter,
    logits: torch.Tensor,
    cache: DynamicCache,
    next_position: int,
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = (),
    should_stop: Callable[[], bool] | None = None,
    on_token: Callable[[list[int]], None] | None = None,
) -> tuple[list[int], int]:
    """Greedy tokens after the context in `cache` (logits [1, V] of its last token).

    Each generated token but the last is appended as a one-token text chunk; stops after a stop id
    (included), after max_new_tokens, or when `should_stop()`, asked before each new token, is true
    (a deadline, a cancelled request: the tokens so far are returned). `on_token(tokens so far)` is
    called after each new token, before the next forward pass. The last token is not in the cache
    yet: a caller that continues the conversation appends it (with whatever follows). Returns
    (token ids, next free position).
    """
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        if should_stop is not None and should_stop():
            break
        token = int(logits[0].argmax())
        tokens.append(token)
        if on_token is not None:
            on_token(tokens)
        if token in stop_ids or len(tokens) == max_new_tokens:
            break
        logits, next_position = adapter.append_text([token], cache, next_position)
    return tokens, next_position
