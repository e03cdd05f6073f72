"""The conversation's text pieces, cut from the checkpoint's own chat template.

The session appends a conversation chunk by chunk: a prefix, one chunk per camera frame, and a
question chunk after which the model answers. Their texts come from the chat template that ships
with the checkpoint (chat_template.json, or the tokenizer's), rendered for a user turn with one and
with two frames followed by a marker question, with the generation prompt:

    one frame   = prefix + frame + question          (the question text in place of the marker)
    two frames  = prefix + frame + frame + question

The second frame is what the two renderings differ by; the prefix is the text before it (the earliest
place the extra frame fits), the question piece the text after it. For a video (LLaVA-OneVision's
video mode) the template renders one placeholder for all frames: the pieces are the text around it.
So a conversation of any number of frames, appended piece by piece, is token for token what the
template gives for the whole conversation (the tests check this with the real processors).

Without a template (a checkpoint that ships none) the adapter's built-in pieces are used, and the
session says so in its log.
"""
from __future__ import annotations

import dataclasses

MARKER = "NCHUNKQUESTIONMARKER"  # stands for the question while rendering; plain text in any template


class TemplateError(ValueError):
    """The chat template cannot be cut into prefix / frame / question pieces."""


@dataclasses.dataclass(frozen=True)
class PromptPieces:
    prefix: str  # before the first frame
    frame: str  # one frame, with the processor's placeholder (expanded to visual tokens)
    question_before: str  # after the last frame, up to the question
    question_after: str  # after the question: end of turn and generation prompt
    source: str  # "chat template" or "built-in"

    def question(self, text: str) -> str:
        return self.question_before + text + self.question_after


def template_of(processor) -> str | None:
    """The checkpoint's chat template: the processor's, else the tokenizer's, else None."""
    for owner in (processor, getattr(processor, "tokenizer", None)):
        template = getattr(owner, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        if isinstance(template, str) and template.strip():
            return template
    return None


def render(tokenizer, template: str, frames: list[dict], question: str) -> str:
    """One user turn: `frames` (content items such as {"type": "image"}), then the question text."""
    conversation = [{"role": "user", "content": [*frames, {"type": "text", "text": question}]}]
    return tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)


def _split_question(rest: str, rendered: str) -> tuple[str, str]:
    if rest.count(MARKER) != 1:
        raise TemplateError(f"the question does not appear once after the frames in {rendered!r}")
    before, after = rest.split(MARKER)
    return before, after


def cut_images(tokenizer, template: str, item: dict) -> PromptPieces:
    """Pieces for frames that each render as one content item (images)."""
    one = render(tokenizer, template, [item], MARKER)
    two = render(tokenizer, template, [item, item], MARKER)
    d = len(two) - len(one)
    if d <= 0:
        raise TemplateError("a second frame adds no text to the rendered conversation")
    common_prefix = next((i for i, (a, b) in enumerate(zip(one, two)) if a != b), len(one))
    common_suffix = next((i for i, (a, b) in enumerate(zip(reversed(one), reversed(two))) if a != b), len(one))
    at = max(0, len(one) - common_suffix)  # earliest place the extra frame fits
    if at > common_prefix or one[at:at + d] != two[at:at + d]:
        raise TemplateError(f"cannot cut a repeated frame out of {one!r} and {two!r}")
    frame = two[at:at + d]
    if MARKER in frame or MARKER in one[:at]:
        raise TemplateError(f"the frames do not come before the question in {one!r}")
    before, after = _split_question(one[at + d:], one)
    return PromptPieces(one[:at], frame, before, after, "chat template")


def cut_video(tokenizer, template: str, placeholder: str) -> PromptPieces:
    """Pieces for frames of one video: the template's video placeholder, rendered once."""
    one = render(tokenizer, template, [{"type": "video"}], MARKER)
    if one.count(placeholder) != 1:
        raise TemplateError(f"the video placeholder {placeholder!r} does not appear once in {one!r}")
    prefix, rest = one.split(placeholder)
    if MARKER in prefix:
        raise TemplateError(f"the video does not come before the question in {one!r}")
    before, after = _split_question(rest, one)
    return PromptPieces(prefix, placeholder, before, after, "chat template")


def prompt_pieces(processor, builtin: PromptPieces, video_placeholder: str | None = None) -> PromptPieces:
    """Pieces from the checkpoint's template (images, or one video if `video_placeholder` is given);
    `builtin` when the checkpoint has no template. A template that cannot be cut is an error."""
    template = template_of(processor)
    if template is None:
        return builtin
    tokenizer = processor.tokenizer
    if video_placeholder is not None:
        return cut_video(tokenizer, template, video_placeholder)
    return cut_images(tokenizer, template, {"type": "image"})
