"""Small checkpoints laid out as the published ones on the Hugging Face Hub, built locally for tests.

`build_published(layout, out_dir)` writes a directory that looks like a downloaded checkpoint of
that layout, with random weights and a tiny backbone (2 decoder layers of 64, a vision tower of 1-2
layers of 32), but everything else as published:

- config.json with the published fields, nesting and `architectures` (Qwen2.5-VL's flat config,
  llava-hf's text_config/vision_config, SmolVLM's idefics3 or smolvlm types), the real special
  token ids, vocabulary sizes and the vision geometry (image size, patch size, pixel shuffle), so
  that the real image processors with the published settings give the published token counts;
- bf16 weights in two shards with `model.safetensors.index.json`, under the published tensor names
  (llava-hf: `language_model.model.*`, `vision_tower.vision_model.*`; Qwen2.5-VL: `model.*`,
  `visual.*`), a tied `lm_head` absent from the files;
- a tokenizer built here (every byte is a token, no merges) whose special tokens have the real ids;
  the other ids up to the real vocabulary size hold filler tokens that no text encodes to;
- chat_template.json with the checkpoint's own template (chat_templates.py), generation_config.json
  as published (Qwen2.5-VL's repetition_penalty 1.05, eos ids), and preprocessor_config.json /
  processor_config.json naming the real image processor and processor classes.

Layouts: idefics3 (HuggingFaceTB/SmolVLM-256M-Instruct), smolvlm (SmolVLM2-256M-Video-Instruct),
llava_onevision (llava-hf/llava-onevision-qwen2-0.5b-ov-hf), qwen2_5_vl (Qwen/Qwen2.5-VL-3B-Instruct).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import torch

from nchunk_core.testing import chat_templates

LAYOUTS = ("idefics3", "smolvlm", "llava_onevision", "qwen2_5_vl")
SHARDS = 2
INIT_RANGE = 0.2  # wider than the real 0.02, so that random logits have clear winners

# The tiny backbone every layout shares: 2 layers, 4 query heads of 16, 2 KV heads.
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=INIT_RANGE)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
HALF = [0.5, 0.5, 0.5]


@dataclasses.dataclass(frozen=True)
class Layout:
    """What one published checkpoint holds, apart from its weights' values."""

    name: str  # the config's model_type
    checkpoint: str  # the Hub repository it mirrors
    specials: dict  # special token -> id, as in the real tokenizer
    tokenizer_size: int  # len(tokenizer) of the real checkpoint
    roles: dict  # bos_token / eos_token / pad_token / unk_token
    config: dict  # config.json
    generation: dict  # generation_config.json
    preprocessor: dict  # preprocessor_config.json
    processor: dict | None  # processor_config.json (None: the checkpoint has none)
    chat_template: str
    renames: tuple = ()  # (model key prefix, published key prefix)
    template_in_tokenizer: bool = False  # the template is in tokenizer_config.json too


def _smol_specials() -> dict:
    rows = {f"<row_{r}_col_{c}>": 49152 + (r - 1) * 6 + c for r in range(1, 7) for c in range(1, 7)}
    return {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<global-img>": 49152, **rows,
            "<fake_token_around_image>": 49189, "<image>": 49190, "<end_of_utterance>": 49279}


SMOL_ROLES = dict(bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
                  unk_token="<|endoftext|>")
QWEN_ROLES = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
QWEN_CHAT = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}


def _smol_config(model_type: str, architecture: str, vision_type: str) -> dict:
    text = dict(TEXT, model_type="llama", architectures=["VLlama3ForCausalLM"], head_dim=16,
                max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000, bos_token_id=1,
                eos_token_id=2, pad_token_id=2, tie_word_embeddings=False, vocab_size=49280)
    vision = dict(VISION, model_type=vision_type, image_size=512, patch_size=16,
                  max_image_size={"longest_edge": 512}, size={"longest_edge": 2048}, use_base_siglip=True)
    return {"architectures": [architecture], "image_token_id": 49190, "model_type": model_type,
            "scale_factor": 4, "text_config": text, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.46.0", "use_cache": True, "vision_config": vision, "vocab_size": 49280}


def _smol_preprocessor(image_processor: str, processor: str) -> dict:
    return {"do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True,
            "do_rescale": True, "do_resize": True, "image_mean": HALF, "image_std": HALF,
            "image_processor_type": image_processor, "max_image_size": {"longest_edge": 512},
            "processor_class": processor, "resample": 1, "rescale_factor": 1 / 255,
            "size": {"longest_edge": 2048}}


SMOL_GENERATION = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 49279, "pad_token_id": 2,
                   "transformers_version": "4.46.0"}
LLAVA_PINPOINTS = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]

PUBLISHED = {
    "idefics3": Layout(
        name="idefics3", checkpoint="HuggingFaceTB/SmolVLM-256M-Instruct", specials=_smol_specials(),
        tokenizer_size=49280, roles=SMOL_ROLES,
        config=_smol_config("idefics3", "Idefics3ForConditionalGeneration", "siglip_vision_model"),
        generation=SMOL_GENERATION,
        preprocessor=_smol_preprocessor("Idefics3ImageProcessor", "Idefics3Processor"),
        processor={"image_seq_len": 64, "processor_class": "Idefics3Processor"},
        chat_template=chat_templates.SMOLVLM),
    "smolvlm": Layout(
        name="smolvlm", checkpoint="HuggingFaceTB/SmolVLM2-256M-Video-Instruct", specials=_smol_specials(),
        tokenizer_size=49280, roles=SMOL_ROLES,
        config=_smol_config("smolvlm", "SmolVLMForConditionalGeneration", "smolvlm_vision"),
        generation=SMOL_GENERATION,
        preprocessor=_smol_preprocessor("SmolVLMImageProcessor", "SmolVLMProcessor"),
        processor={"image_seq_len": 64, "processor_class": "SmolVLMProcessor"},
        chat_template=chat_templates.SMOLVLM2),
    "llava_onevision": Layout(
        name="llava_onevision", checkpoint="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        specials={**QWEN_CHAT, "<image>": 151646, "<video>": 151647}, tokenizer_size=151648, roles=QWEN_ROLES,
        config={
            "architectures": ["LlavaOnevisionForConditionalGeneration"], "ignore_index": -100,
            "image_grid_pinpoints": LLAVA_PINPOINTS, "image_token_index": 151646, "model_type": "llava_onevision",
            "projector_hidden_act": "gelu", "tie_word_embeddings": True, "torch_dtype": "float16",
            "transformers_version": "4.45.0.dev0", "use_image_newline_parameter": True,
            "video_token_index": 151647, "vision_aspect_ratio": "anyres_max_9",
            "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
            "text_config": dict(TEXT, _name_or_path="Qwen/Qwen2-0.5B-Instruct", architectures=["Qwen2ForCausalLM"],
                                bos_token_id=151643, eos_token_id=151645, max_position_embeddings=32768,
                                max_window_layers=24, model_type="qwen2", rope_theta=1000000.0,
                                tie_word_embeddings=True, torch_dtype="bfloat16", use_sliding_window=False,
                                vocab_size=152000),
            "vision_config": dict(VISION, image_size=384, model_type="siglip_vision_model", patch_size=14,
                                  vision_use_head=False),
        },
        generation={"bos_token_id": 151643, "eos_token_id": 151645, "transformers_version": "4.45.0.dev0"},
        preprocessor={"do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
                      "do_resize": True, "image_grid_pinpoints": LLAVA_PINPOINTS, "image_mean": HALF,
                      "image_processor_type": "LlavaOnevisionImageProcessor", "image_std": HALF,
                      "processor_class": "LlavaOnevisionProcessor", "resample": 3, "rescale_factor": 1 / 255,
                      "size": {"height": 384, "width": 384}},
        processor={"num_image_tokens": 729, "processor_class": "LlavaOnevisionProcessor",
                   "vision_aspect_ratio": "anyres_max_9", "vision_feature_select_strategy": "full"},
        chat_template=chat_templates.LLAVA_ONEVISION,
        renames=(("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                 ("model.vision_tower.", "vision_tower.vision_model."),
                 ("model.multi_modal_projector.", "multi_modal_projector."), ("model.image_newline", "image_newline"))),
    "qwen2_5_vl": Layout(
        name="qwen2_5_vl", checkpoint="Qwen/Qwen2.5-VL-3B-Instruct",
        specials={**QWEN_CHAT, "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647,
                  "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650, "<|quad_end|>": 151651,
                  "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
                  "<|image_pad|>": 151655, "<|video_pad|>": 151656},
        tokenizer_size=151657, roles=QWEN_ROLES,
        config=dict(
            TEXT, architectures=["Qwen2_5_VLForConditionalGeneration"], attention_dropout=0.0, bos_token_id=151643,
            eos_token_id=151645, vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654,
            image_token_id=151655, video_token_id=151656, hidden_act="silu", max_position_embeddings=128000,
            max_window_layers=70, model_type="qwen2_5_vl", rms_norm_eps=1e-6, rope_theta=1000000.0,
            sliding_window=32768, tie_word_embeddings=True, torch_dtype="bfloat16", transformers_version="4.41.2",
            use_cache=True, use_sliding_window=False, vocab_size=151936,
            # mrope splits the 8 rotary frequencies (head_dim 16 / 2) into t, h, w sections
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            vision_config={"depth": 2, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64,
                           "num_heads": 2, "in_chans": 3, "out_hidden_size": 64, "patch_size": 14,
                           "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                           "fullatt_block_indexes": [1], "tokens_per_second": 2, "temporal_patch_size": 2,
                           "initializer_range": INIT_RANGE}),
        generation={"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                    "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.1,
                    "top_p": 0.001, "top_k": 1, "transformers_version": "4.49.0"},
        preprocessor={"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                      "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
                      "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"},
        processor=None, chat_template=chat_templates.QWEN2_5_VL,
        renames=(("model.language_model.", "model."), ("model.visual.", "visual.")), template_in_tokenizer=True),
}


# ---------------------------------------------------------------- tokenizer


def _fillers():
    """Strings of 2, then 3 byte-level characters: vocabulary entries that no text encodes to
    (there are no merges), so that ids between the real special tokens exist and decode."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for n in (2, 3):
        for chars in itertools.product(alphabet, repeat=n):
            yield "".join(chars)


def build_tokenizer(layout: Layout):
    """Byte-level tokenizer with the layout's special tokens at their real ids (see module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    by_id = {i: t for t, i in layout.specials.items()}
    alphabet = iter(sorted(pre_tokenizers.ByteLevel.alphabet()))
    fillers = _fillers()
    vocab = {}
    for i in range(layout.tokenizer_size):  # bytes take the first free ids, fillers the rest
        vocab[by_id.get(i) or next(alphabet, None) or next(fillers)] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(layout.specials))  # already in the vocabulary: they keep their ids
    out = PreTrainedTokenizerFast(tokenizer_object=tok, **layout.roles)
    wrong = {t: out.convert_tokens_to_ids(t) for t, i in layout.specials.items() if out.convert_tokens_to_ids(t) != i}
    if wrong or len(out) != layout.tokenizer_size:
        raise RuntimeError(f"{layout.name}: tokenizer ids {wrong}, size {len(out)} (want {layout.tokenizer_size})")
    return out


# ---------------------------------------------------------------- weights


def published_key(layout: Layout, key: str) -> str:
    """The name a model state-dict key has in the published files."""
    for ours, theirs in layout.renames:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def write_weights(model: torch.nn.Module, layout: Layout, out_dir: Path) -> dict[str, str]:
    """bf16 shards + index under the published names, tied tensors left out; returns the weight map."""
    from safetensors.torch import save_file

    from nchunk_core.runtime.flash_model import tied_keys

    tied = set(tied_keys(model))
    state = {published_key(layout, k): v.detach().to(torch.bfloat16).contiguous()
             for k, v in model.state_dict().items() if k not in tied}
    names = sorted(state)
    total = sum(v.numel() * v.element_size() for v in state.values())
    shards, size, current = [[]], 0, 0
    for name in names:  # split where the running size passes half of the total
        if size >= total * (current + 1) / SHARDS and current < SHARDS - 1:
            shards.append([])
            current += 1
        shards[-1].append(name)
        size += state[name].numel() * state[name].element_size()
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n] for n in shard}, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return weight_map


# ---------------------------------------------------------------- the whole checkpoint


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def build_published(layout: str, out_dir, seed: int = 0, dimensions: str = "tiny",
                    text_layers: int | None = None) -> Path:
    """Write a checkpoint in the published layout `layout` to `out_dir` (see module docstring):
    `dimensions` "tiny" (the test backbone) or "published" (the real sizes, published_dimensions.py,
    with `text_layers` decoder layers if given)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    if layout not in PUBLISHED:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if dimensions not in ("tiny", "published"):
        raise ValueError(f"dimensions must be tiny or published, got {dimensions!r}")
    spec = PUBLISHED[layout]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = spec.config
    if dimensions == "published":
        from nchunk_core.testing.published_dimensions import sized_config

        config = sized_config(layout, config, text_layers)
    _write_json(out / "config.json", config)
    config = AutoConfig.from_pretrained(str(out), local_files_only=True)
    torch.manual_seed(seed)
    # at the real sizes the weights are made in bf16, as written: a 3B model in fp32 plus its bf16
    # copy would need about 22 GB
    kwargs = {"dtype": torch.bfloat16} if dimensions == "published" else {}
    model = AutoModelForImageTextToText.from_config(config, **kwargs).eval()
    write_weights(model, spec, out)
    _write_json(out / "generation_config.json", spec.generation)
    build_tokenizer(spec).save_pretrained(str(out))
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config.pop("processor_class", None)
    if spec.template_in_tokenizer:
        tokenizer_config["chat_template"] = spec.chat_template
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "preprocessor_config.json", spec.preprocessor)
    if spec.processor is not None:
        _write_json(out / "processor_config.json", spec.processor)
    _write_json(out / "chat_template.json", {"chat_template": spec.chat_template})
    return out


def load_reference(path, dtype: torch.dtype = torch.float32):
    """The checkpoint as transformers loads it: (model in eval mode, processor)."""
    from transformers import AutoModelForImageTextToText

    from nchunk_core.runtime.processors import load_processor

    model = AutoModelForImageTextToText.from_pretrained(str(path), local_files_only=True, dtype=dtype).eval()
    return model, load_processor(path, model.config.model_type)
