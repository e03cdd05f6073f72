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

What a frame costs is the adapter's frame mode (`frame_tokens`, see setting_values.FRAME_TOKENS_HELP): the model's
video mode where it has one, a single view or tiles, or a pixel budget; "auto" is the cheapest mode
the model was trained with. Several frames take the layout the real processor gives several images
(or the frames of one video). The prompt pieces come from the checkpoint's chat template (prompts.py).

The adapter also names the decoder's projections for the flash runtime, which swaps each of them
for a streamed module: `projection_groups(model)` lists, per decoder layer, the projections sharing
one input: {"attn_in": [q, k, v], "attn_out": [o], "mlp_in": [gate, up], "mlp_out": [down]}, as
module paths relative to the model (`model.get_submodule(path)`).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from nchunk_core.runtime.config import frame_tokens_value
from nchunk_core.runtime.prompts import PromptPieces, prompt_pieces, template_of

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
    question: bool = False  # the chunk after the frames that asks the question

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


class VLMAdapter:
    """Architecture-specific glue between frames / text and a transformers VLM with a KV cache."""

    arch: str = ""
    layers_path: str = ""  # module path of the decoder's nn.ModuleList
    vision_keys: tuple[str, ...] = ()  # processor outputs the model forward needs for an image
    # Built-in prompt pieces, used when the checkpoint has no chat template: a conversation is
    # prompt_prefix, then one frame_prompt per frame (the image placeholder expands to visual
    # tokens), then question_template with the question, after which the model answers.
    prompt_prefix: str = ""
    frame_prompt: str = ""
    question_template: str = "{question}"
    # Frame modes (mode -> what a frame becomes). frame_tokens="auto" picks cheapest_mode for a
    # checkpoint with a chat template (a published one), builtin_mode for one without (test and
    # demo models, trained with their processor's own layout).
    frame_modes: dict[str, str] = {}
    cheapest_mode: str = ""
    builtin_mode: str = ""
    pixel_budget: bool = False  # frame_tokens may be a number: at most that many visual tokens

    def __init__(self, model: nn.Module, processor=None, frame_tokens="auto"):
        self.model = model
        self.processor = processor
        self.image_token_id = int(model.config.image_token_id)
        self.has_template = processor is not None and template_of(processor) is not None
        self.frame_mode, self.token_budget = self.check_frame_tokens(frame_tokens)
        self.prompt = self._prompt_pieces()
        self.prompt_prefix, self.frame_prompt = self.prompt.prefix, self.prompt.frame

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

    # ------------------------------------------------------------ settings

    @classmethod
    def frame_mode_for(cls, value, has_template: bool = True) -> tuple[str, int | None]:
        """(frame mode, token budget or None) for a frame_tokens value checked by frame_tokens_value;
        ValueError if this architecture has no such mode."""
        choices = f"auto, {', '.join(cls.frame_modes)}" + (" or a number of tokens" if cls.pixel_budget else "")
        if isinstance(value, int):
            if not cls.pixel_budget:
                raise ValueError(f"frame_tokens={value}: {cls.arch} has no pixel budget; choose {choices}")
            return cls.cheapest_mode, value
        if value == "auto":
            return (cls.cheapest_mode if has_template else cls.builtin_mode), None
        if value not in cls.frame_modes:
            raise ValueError(f"frame_tokens={value!r} is not a frame mode of {cls.arch}; choose {choices}")
        return value, None

    def check_frame_tokens(self, value) -> tuple[str, int | None]:
        """(frame mode, token budget or None) that the setting `value` gives this model; ValueError if none."""
        return self.frame_mode_for(frame_tokens_value(value), self.has_template)

    def with_frame_tokens(self, value) -> "VLMAdapter":
        """An adapter of the same model and processor whose frames cost `value` (a frame_tokens setting)."""
        return type(self)(self.model, self.processor, frame_tokens=value)

    def builtin_prompt(self) -> PromptPieces:
        cls = type(self)
        before, after = cls.question_template.split("{question}")
        return PromptPieces(cls.prompt_prefix, cls.frame_prompt, before, after, "built-in")

    def _prompt_pieces(self) -> PromptPieces:
        if self.processor is None:
            return self.builtin_prompt()
        return prompt_pieces(self.processor, self.builtin_prompt())

    def describe(self) -> str:
        """One line for the log: the frame mode and where the prompt comes from."""
        budget = f", at most {self.token_budget} tokens" if self.token_budget else ""
        source = ("the checkpoint's chat template" if self.prompt.source == "chat template"
                  else "built-in strings (the checkpoint has no chat template)")
        return f"frames: {self.frame_mode} ({self.frame_modes[self.frame_mode]}{budget}); prompt from {source}"

    # ------------------------------------------------------------ encoding

    def question_prompt(self, question: str) -> str:
        return self.prompt.question(question)

    def encode_question(self, question: str) -> Chunk:
        """The chunk after the frames: the question in its turn, then the generation prompt."""
        return dataclasses.replace(self.encode_text(self.question_prompt(question)), question=True)

    def processor_options(self) -> dict:
        """Keyword arguments of the processor call that give the frame mode."""
        return {}

    def encode_frame(self, image) -> Chunk:
        """A frame (PIL image or uint8 array [H, W, 3]) → its chunk: frame_prompt with visual tokens."""
        image = self._frame_image(image)
        out = self.processor(images=[image], text=[self.frame_prompt], return_tensors="pt", **self.processor_options())
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

    def _expanded_ids(self, text: str, token: str, count: int, token_id: int) -> torch.Tensor:
        """Token ids [1, T] of `text` with its one `token` repeated `count` times."""
        ids = self.processor.tokenizer(text.replace(token, token * count), add_special_tokens=False,
                                       return_tensors="pt")["input_ids"]
        if int((ids == token_id).sum()) != count:
            raise RuntimeError(f"{token!r} does not encode to the model's token id {token_id}")
        return ids

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

    def model_inputs(self, chunk: Chunk) -> dict:
        """The forward's inputs for the chunk (token ids and vision inputs)."""
        return {"input_ids": chunk.input_ids, **chunk.vision}

    @torch.no_grad()
    def append(self, chunk: Chunk, cache: DynamicCache, next_position: int) -> tuple[torch.Tensor, int]:
        """Run the chunk through the model on top of `cache` (grown in place).

        Returns the logits of the chunk's last token [1, V] (float32) and the next free position.
        """
        if chunk.num_tokens == 0:
            raise ValueError("cannot append an empty chunk")
        chunk = self._on_model_device(chunk)
        position_ids, next_position = self.positions(chunk, next_position)
        out = self.model(**self.model_inputs(chunk), position_ids=position_ids, cache=cache, use_cache=True,
                         logits_to_keep=1)
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
    """LLaVA-OneVision (SigLIP + Qwen2), 1-D positions. Frames in three modes (counts for the
    published 384-px model, whose processor has num_image_tokens 729 = 27²):

    - "video" (auto): the frames of one video, as the video processor and the model make them: each
      frame's base view, 2×2 bilinear pooling of the patch grid (⌈27/2⌉² = 196 tokens), and one
      newline after the last frame, which opens the question chunk (the template puts the video
      before the question text);
    - "image": one of several images, as the processor does for several images in a turn: the frame
      padded to a square and resized, and one newline (729 + 1 = 730 tokens);
    - "tiles": each frame a lone high-resolution image (anyres: base view, tiles, row newlines;
      2929 tokens for 640×480), as the processor does for a single image.

    Pixels of the video mode are the base view from the image processor (the whole frame resized to
    the vision input, as the video processor does), so no video processor (torchvision) is needed.
    """

    arch = "llava_onevision"
    layers_path = "model.language_model.layers"
    vision_keys = ("pixel_values", "image_sizes")
    prompt_prefix = "<|im_start|>user "
    frame_prompt = "<image>\n"
    question_template = "{question}<|im_end|>\n<|im_start|>assistant\n"
    frame_modes = {
        "video": "a frame of one video: the base view pooled 2x2 (196 tokens at 384 px), one newline after all",
        "image": "one of several images: padded to a square, and a newline (730 tokens at 384 px)",
        "tiles": "a lone image at full resolution: base view and anyres tiles (2929 tokens for 640x480)",
    }
    cheapest_mode = "video"
    builtin_mode = "tiles"

    def __init__(self, model: nn.Module, processor=None, frame_tokens="auto"):
        self.video_token_id = int(model.config.video_token_id)
        super().__init__(model, processor, frame_tokens)

    def _prompt_pieces(self) -> PromptPieces:
        if self.frame_mode != "video" or self.processor is None:
            return super()._prompt_pieces()
        video = self.processor.video_token
        builtin = self.builtin_prompt()
        builtin = dataclasses.replace(builtin, frame=builtin.frame.replace(self.processor.image_token, video))
        return prompt_pieces(self.processor, builtin, video_placeholder=video)

    def question_prompt(self, question: str) -> str:
        text = super().question_prompt(question)
        if self.frame_mode == "video":  # the newline that closes the video: one video token first
            return self.processor.video_token + text
        return text

    def encode_frame(self, image) -> Chunk:
        if self.frame_mode == "tiles":
            return super().encode_frame(image)
        image = self._frame_image(image)
        processor, side = self.processor, self.model.config.vision_config.image_size
        if self.frame_mode == "video":  # the base view: the whole frame resized to the vision input
            out = processor.image_processor(images=[image], image_grid_pinpoints=[[side, side]], return_tensors="pt")
            n_visual = math.ceil(int(math.sqrt(processor.num_image_tokens)) / 2) ** 2  # pooled patch grid
            ids = self._expanded_ids(self.frame_prompt, processor.video_token, n_visual, self.video_token_id)
            vision = {"pixel_values_videos": out["pixel_values"][:, :1]}  # [1, 1 frame, 3, side, side]
            return Chunk(input_ids=ids, vision=vision, num_visual_tokens=n_visual)
        # One of several images is padded to a square, then resized: the image processor does so for
        # an image of a sample with two; the first of the pair is this frame's view.
        out = processor.image_processor(images=[[image, image]], return_tensors="pt")
        base = out["pixel_values"][:1]  # [1, 1, 3, side, side]
        n_visual = self.processor.num_image_tokens + 1  # + the newline
        if self.processor.vision_feature_select_strategy == "default":
            n_visual -= 1  # the class token is dropped
        ids = self._expanded_ids(self.frame_prompt, self.processor.image_token, n_visual, self.image_token_id)
        # batch_num_images above 1 tells the model that the image is one of several (base view only)
        vision = {"pixel_values": base, "image_sizes": out["image_sizes"][:1], "batch_num_images": torch.tensor([2])}
        return Chunk(input_ids=ids, vision=vision, num_visual_tokens=n_visual)

    def model_inputs(self, chunk: Chunk) -> dict:
        if self.frame_mode != "video" or not (chunk.question or "pixel_values_videos" in chunk.vision):
            return super().model_inputs(chunk)
        if chunk.question:  # its first token is the video's closing newline
            if int(chunk.input_ids[0, 0]) != self.video_token_id:
                raise ValueError("a question after video frames must start with the video token")
            newline = self.model.model.image_newline.to(self.model.dtype)
            features = BaseModelOutputWithPooling(pooler_output=newline[None, None])  # [1, 1, D]
        else:  # a frame: the model's video features of one frame, less the newline that closes them
            video = self.model.get_video_features(chunk.vision["pixel_values_videos"], return_dict=True)
            features = BaseModelOutputWithPooling(pooler_output=video.pooler_output[:, :-1])  # [1, 196, D]
        return {"input_ids": chunk.input_ids, "mm_encoder_outputs": {"video": features}}


class Qwen2_5_VLAdapter(VLMAdapter):
    """Qwen2.5-VL: native-resolution vision tower, 3-D mrope positions tracked by the adapter.

    One frame mode, "image": the frame at its own resolution within the processor's pixel limits
    (391 tokens for 640×480 with the published limits); a number as frame_tokens lowers the pixel
    limit so that a frame has at most that many visual tokens (28×28 pixels each).
    """

    arch = "qwen2_5_vl"
    layers_path = "model.language_model.layers"
    vision_keys = ("pixel_values", "image_grid_thw")
    prompt_prefix = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    frame_prompt = "<|vision_start|><|image_pad|><|vision_end|>"
    question_template = "{question}<|im_end|>\n<|im_start|>assistant\n"
    frame_modes = {"image": "the frame at its own resolution within the processor's pixel limits"}
    cheapest_mode = builtin_mode = "image"
    pixel_budget = True

    def processor_options(self) -> dict:
        if self.token_budget is None:
            return {}
        ip = self.processor.image_processor
        pixels = self.token_budget * (ip.patch_size * ip.merge_size) ** 2  # one token per merged patch
        return {"size": {"shortest_edge": min(ip.size["shortest_edge"], pixels), "longest_edge": pixels}}

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
    """SmolVLM2 (SigLIP + pixel shuffle + Llama), 1-D positions. Frames as one view ("image",
    auto: 64 tokens on the published 512-px models, as SmolVLM2 takes video frames) or split into
    tiles of the vision input plus a global view ("tiles": 13 × 64 = 832 tokens for 640×480)."""

    arch = "smolvlm"
    layers_path = "model.text_model.layers"
    vision_keys = ("pixel_values", "pixel_attention_mask")
    prompt_prefix = "<|im_start|>User:"
    frame_prompt = "<image>"
    question_template = "{question}<end_of_utterance>\nAssistant:"
    frame_modes = {
        "image": "the frame as one view, not split (64 tokens at 512 px)",
        "tiles": "tiles of the vision input and a global view (832 tokens for 640x480 at 512 px)",
    }
    cheapest_mode = "image"
    builtin_mode = "tiles"

    def processor_options(self) -> dict:
        return {"do_image_splitting": self.frame_mode == "tiles"}


class Idefics3Adapter(SmolVLMAdapter):
    """SmolVLM v1 (SmolVLM-256M/500M/2B-Instruct): model_type idefics3, the same layout as SmolVLM2,
    with the real Idefics3Processor (which needs no video processor)."""

    arch = "idefics3"


ADAPTERS = {cls.arch: cls for cls in (LlavaOnevisionAdapter, Qwen2_5_VLAdapter, SmolVLMAdapter, Idefics3Adapter)}


def adapter_class(model_type: str) -> type[VLMAdapter]:
    if model_type not in ADAPTERS:
        known = sorted(ADAPTERS)
        raise ValueError(f"no frame-appending adapter for model type {model_type!r}; known: {known}")
    return ADAPTERS[model_type]


def adapter_for(model: nn.Module, processor=None, **options) -> VLMAdapter:
    """The adapter for a loaded VLM (by `model.config.model_type`); options go to its constructor."""
    return adapter_class(model.config.model_type)(model, processor, **options)
