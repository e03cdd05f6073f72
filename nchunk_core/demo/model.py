"""The built-in demo model: a small SmolVLM that answers questions about scenes of coloured shapes.

Architecture: the real transformers `SmolVLMForConditionalGeneration` (SigLIP-style vision tower,
pixel-shuffle connector, Llama backbone), sized to learn the task of scenes.py on two CPU cores:

    frame (any size) --processor--> 96×96 pixels --vision, 12×12 patches of 8 px, 3 layers × 96-->
    pixel shuffle ×3 --> 16 visual tokens --Llama backbone, 4 layers × 128, MLP 384--> word

Tokenizer: word-level, built here with the `tokenizers` library: the words of the task (scenes.py),
the prompt words of the SmolVLM chat format and SmolVLM's special tokens; anything else is [UNK].
Text is lower-cased, so "What colour is the Circle?" reads as the training questions do.

`build_untrained(seed)` makes the model and processor; train_demo.py trains them; `shipped_store()`
is the converted store in the package (nchunk_core/demo/data/shapes-vlm), which `nchunk demo` uses.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMForConditionalGeneration
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from nchunk_core.demo import scenes
from nchunk_core.runtime.adapters import SmolVLMAdapter
from nchunk_core.runtime.processors import ImageOnlySmolVLMProcessor
from nchunk_core.store.recommended import Recommended
from nchunk_core.testing.tiny_models import ROLE_TOKENS, SPECIAL_TOKENS

IMAGE_SIDE = 96  # the processor squashes every frame to IMAGE_SIDE × IMAGE_SIDE
PATCH = 8
SCALE_FACTOR = 3  # pixel shuffle: (96 / 8 / 3)² = 16 visual tokens per frame
VISUAL_TOKENS = (IMAGE_SIDE // PATCH // SCALE_FACTOR) ** 2
# Initial weights N(0, 0.05²), about 0.55/sqrt(width) as GPT-2's 0.02 is for 768: the library's 0.02
# default is made for widths ten times larger and leaves these narrow layers with near-uniform
# attention for hundreds of steps.
INIT_STD = 0.05
VISION = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
              image_size=IMAGE_SIDE, patch_size=PATCH, initializer_range=INIT_STD)
TEXT = dict(model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=INIT_STD)
TRAIN_MINUTES = 51  # `nchunk train-demo` with the defaults on 2 CPU cores (README, "The built-in model")
UNK = "[UNK]"
# Words of the prompts around a question (SmolVLMAdapter) and of common paraphrases.
PROMPT_WORDS = ["user", ":", "assistant", "?", ".", ",", "colour", "which", "the", "a", "an", "is",
                "are", "there", "any", "in", "image", "picture", "frame", "what", "shape", "shapes",
                "do", "you", "see", "to", "of", "how", "many", "left", "right", "nothing", "yes", "no"]


def task_words() -> list[str]:
    """Every word that questions and answers of scenes.py use, plus PROMPT_WORDS."""
    words = PROMPT_WORDS + ["color"] + list(scenes.COLORS) + list(scenes.SHAPES)
    words += list(scenes.PLURALS.values()) + [str(n) for n in range(scenes.COLUMNS + 1)]
    return list(dict.fromkeys(words))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: [UNK], SmolVLM's special tokens, then the task's words."""
    specials = SPECIAL_TOKENS["smolvlm"]
    vocab = {w: i for i, w in enumerate([UNK] + specials + task_words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    tok.add_special_tokens(specials)
    bos, eos, pad = ROLE_TOKENS["smolvlm"]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=UNK)


def build_processor(tok=None) -> ImageOnlySmolVLMProcessor:
    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": IMAGE_SIDE}, max_image_size={"longest_edge": IMAGE_SIDE},
        do_image_splitting=False)
    return ImageOnlySmolVLMProcessor(image_processor=image_processor, tokenizer=tok or build_tokenizer(),
                                     image_seq_len=VISUAL_TOKENS)


def build_config(tok) -> SmolVLMConfig:
    text = dict(TEXT, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    return SmolVLMConfig(text_config=text, vision_config=VISION, scale_factor=SCALE_FACTOR,
                         image_token_id=tok.convert_tokens_to_ids("<image>"), initializer_range=INIT_STD)


def build_untrained(seed: int = 0) -> tuple[SmolVLMForConditionalGeneration, ImageOnlySmolVLMProcessor]:
    processor = build_processor()
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(build_config(processor.tokenizer))
    return model, processor


def prompt(question: str, answer: str | None = None) -> str:
    """The conversation the runtime builds for one frame and a question (SmolVLMAdapter's format),
    followed by the answer and the end-of-utterance token when `answer` is given."""
    text = SmolVLMAdapter.prompt_prefix + SmolVLMAdapter.frame_prompt
    text += SmolVLMAdapter.question_template.format(question=question)
    return text if answer is None else f"{text} {answer}<end_of_utterance>"


# The settings the shipped store records (store/recommended.py): the highest sparsity of
# `nchunk bench accuracy` at which chunking keeps at least 0.97 of dense accuracy; one frame in
# context (the model was trained on one); answers are at most two words, so 4 tokens, as `nchunk demo`.
RECOMMENDED = Recommended(
    sparsity=0.1, method="chunking", max_frames=1, max_new_tokens=4,
    basis="nchunk bench accuracy --scenes 100 (384 held-out questions): dense 0.990; chunking 0.984 at "
          "sparsity 0.1 (0.994 of dense), 0.938 at 0.2 (0.947); trained on one frame; answers of 1-2 words")


def shipped_store() -> Path:
    """The trained, converted store that ships with the package."""
    return Path(__file__).parent / "data" / "shapes-vlm"
