"""Image-only processors of the supported architectures, and the stop tokens of a store.

The real processor classes of LLaVA-OneVision, Qwen2.5-VL and SmolVLM2 require a video processor,
and every video processor in transformers requires torchvision, which is not installed everywhere
(not on every Jetson image). Frames are still images, so each of them gets an image-only subclass
of its real processor (same image-token expansion, no video processor); the image processors
themselves fall back to their PIL implementations without torchvision. SmolVLM v1 (idefics3) uses
the real Idefics3Processor, which has no video processor. The SmolVLM subclass also skips the
real class's `num2words` requirement, which only video prompts use.

Importing this module registers the subclasses with `AutoProcessor`, so that
`AutoProcessor.from_pretrained(store)` finds them by the name saved in processor_config.json.

    processor = load_processor(store_path, "smolvlm")
    stop_ids = stop_token_ids(store_path, processor.tokenizer)
"""
from __future__ import annotations

from pathlib import Path

from transformers import (
    AutoProcessor,
    Idefics3Processor,
    LlavaOnevisionConfig,
    LlavaOnevisionProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    SmolVLMConfig,
    SmolVLMProcessor,
)
from transformers.processing_utils import ProcessorMixin


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without a video processor (works without torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The parent passes (image_processor, tokenizer, None) on; ProcessorMixin keeps only the
        # attributes named in this signature, so the missing video processor is never checked.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision processor without a video processor (works without torchvision)."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        **kwargs,
    ):
        super().__init__(
            image_processor,
            tokenizer,
            None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """SmolVLM processor without a video processor and without `num2words` (video prompts only)."""

    def __init__(self, image_processor, tokenizer, image_seq_len: int = 169, chat_template=None, **kwargs):
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


# Registration lets AutoProcessor find these classes by the name saved in processor_config.json.
AutoProcessor.register(Qwen2_5_VLConfig, ImageOnlyQwen2_5_VLProcessor, exist_ok=True)
AutoProcessor.register(LlavaOnevisionConfig, ImageOnlyLlavaOnevisionProcessor, exist_ok=True)
AutoProcessor.register(SmolVLMConfig, ImageOnlySmolVLMProcessor, exist_ok=True)

PROCESSORS = {
    "idefics3": Idefics3Processor,
    "llava_onevision": ImageOnlyLlavaOnevisionProcessor,
    "qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor,
    "smolvlm": ImageOnlySmolVLMProcessor,
}


def load_processor(path, arch: str):
    """The image-only processor of `arch` saved in `path` (no video processor, no torchvision)."""
    try:
        return PROCESSORS[arch].from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: cannot load the {arch} processor and tokenizer: {exc}") from exc


def stop_token_ids(path, tokenizer) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json's eos_token_id(s) and the tokenizer's eos."""
    from transformers import GenerationConfig

    ids = set()
    if (Path(path) / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(str(path), local_files_only=True).eos_token_id
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))
