"""Training data of the built-in model: scenes become the runtime's token ids and pixels, in batches.

Every scene gives one question of each kind, another colour, presence and position question, and
"what shapes are there?" answered with every shape left to right (`scene_questions`). Validation and
test scenes are drawn from their own seeds, and the training stream skips their layouts. Scenes
hold at most two shapes for the first `curriculum_steps`, three for as many again, then up to four.

A batch holds each image once: its pixels, rendered at the camera's 320×240 and put through the
model's own processor, so the model sees exactly what the runtime feeds it. Each question row holds
the same ids as the runtime's conversation after the shared context (prefix and frame chunk;
demo_model.prompt): the question chunk, then the answer and <end_of_utterance>. `Batches` renders
the next batches on a background thread while a step runs.
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from nchunk_core.demo import scenes
from nchunk_core.demo.train_settings import FRAME_H, FRAME_W, Settings
from nchunk_core.demo.training_aids import COLOUR_CLASS, HINTS, SHAPE_CLASS, probe_targets
from nchunk_core.runtime.adapters import SmolVLMAdapter


class Encoder:
    """Turns (scene, question, answer) into the runtime's token ids and pixels."""

    def __init__(self, model, processor):
        self.adapter = SmolVLMAdapter(model, processor)
        self.tok = processor.tokenizer
        frame = self.adapter.encode_frame(np.zeros((FRAME_H, FRAME_W, 3), np.uint8))
        prefix = self.adapter.encode_text(SmolVLMAdapter.prompt_prefix).input_ids[0]
        self.context = torch.cat([prefix, frame.input_ids[0]])  # [C] prefix + frame chunk
        where = (self.context == self.adapter.image_token_id).nonzero()[:, 0]
        self.image_slice = slice(int(where[0]), int(where[-1]) + 1)
        self.eos = self.tok.convert_tokens_to_ids("<end_of_utterance>")
        # shape word ids → SHAPE_CLASS; a question's last one is where the aids act (collate)
        self.shape_of = {self.tok.convert_tokens_to_ids(w): SHAPE_CLASS[sh] for sh in scenes.SHAPES
                         for w in (sh, scenes.PLURALS[sh])}
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def pixels(self, scene: scenes.Scene) -> torch.Tensor:
        """[3, S, S] float32: the scene rendered and preprocessed like a camera frame."""
        chunk = self.adapter.encode_frame(scenes.render_scene(scene))
        return chunk.vision["pixel_values"][0, 0]

    def sequence(self, q: scenes.Question) -> tuple[list[int], int, int | None]:
        """Token ids after the context (question chunk, answer, end), how many are targets, and the
        index of the question's last shape word (None for the description, which names none)."""
        question = self.ids(self.adapter.question_prompt(q.text))
        answer = self.ids(q.answer) + [self.eos]
        objects = [i for i, t in enumerate(question) if t in self.shape_of]
        return question + answer, len(answer), objects[-1] if objects and q.kind in scenes.KINDS else None


def collate(encoder: Encoder, items: list[tuple[torch.Tensor, list[scenes.Question]]]):
    """→ pixels [B, 3, S, S], owner image [N], question-part ids [N, T], labels [N, T], early [N, T],
    subject [N, 3].

    Row r is the part of question r after the shared context (prefix + frame chunk): question chunk,
    answer, end token, right-padded. labels[r, t] is the token that position t must predict (-100:
    no loss). early[r, t] is the answer's first token at the question's last shape word ("circle" in
    "what color is the circle?"), -100 elsewhere: the early-answer training aid (see train).
    subject[r] is what the attention hints look for (HINTS), 0 for none: [r, 0] the SHAPE_CLASS of
    that word (not for count questions, where all of the attention on the shape would hide how many
    there are), [r, 1] the COLOUR_CLASS of the shape that a position question's answer names,
    [r, 2] the COLOUR_CLASS that a presence question names.
    """
    pixels = torch.stack([p for p, _ in items])
    owners = [i for i, (_, qs) in enumerate(items) for _ in qs]
    questions = [q for _, qs in items for q in qs]
    seqs = [encoder.sequence(q) for q in questions]
    width = max(len(row) for row, *_ in seqs)
    ids = torch.full((len(seqs), width), encoder.tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    early = torch.full_like(labels, -100)
    subject = torch.zeros(len(seqs), len(HINTS), dtype=torch.long)
    for r, ((row, n_target, obj), q) in enumerate(zip(seqs, questions)):
        ids[r, : len(row)] = torch.tensor(row)
        labels[r, len(row) - n_target - 1 : len(row) - 1] = torch.tensor(row[-n_target:])
        if obj is not None:
            early[r, obj] = row[-n_target]
            if q.kind != "count":  # a count is read from how much of the attention the shape takes
                subject[r, 0] = encoder.shape_of[row[obj]]
        if q.kind == "position" and q.answer != "nothing":
            subject[r, 1] = COLOUR_CLASS[q.answer.split()[0]]
        if q.kind == "presence":  # "is there a red square?"
            subject[r, 2] = COLOUR_CLASS[q.text.split()[-2]]
    return pixels, torch.tensor(owners), ids, labels, early, subject


def scene_questions(scene: scenes.Scene, rng: np.random.Generator) -> list[scenes.Question]:
    """Training questions of a scene: one of each kind it allows, another colour, presence and
    position question (the kinds that need the model to bind a colour to one shape, which it
    learns last), and the description (every shape named in order)."""
    more = [scenes.colour_question(scene, rng), scenes.presence_question(scene, rng),
            scenes.position_question(scene, rng), scenes.describe_question(scene)]
    return scenes.questions_for(scene, rng) + [q for q in more if q is not None]


class Batches:
    """Training batches rendered by a background thread (the step's arithmetic runs meanwhile)."""

    def __init__(self, encoder: Encoder, s: Settings, held_out: set):
        self.encoder, self.s, self.held_out = encoder, s, held_out
        self.queue: queue.Queue = queue.Queue(maxsize=3)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="batches")
        self._thread.start()

    def _max_shapes(self, step: int) -> int:
        c = self.s.curriculum_steps
        return 2 if step < c else 3 if step < 2 * c else scenes.COLUMNS

    def _run(self) -> None:
        rng = np.random.default_rng([self.s.seed, 7])
        index = 0
        for step in range(self.s.steps):
            try:
                items, columns = [], []
                while len(items) < self.s.images_per_step:
                    scene = scenes.split_scene("train", index, self.s.seed, FRAME_W, FRAME_H,
                                               self._max_shapes(step))
                    index += 1
                    if scene.key in self.held_out:
                        continue
                    items.append((self.encoder.pixels(scene), scene_questions(scene, rng)))
                    columns.append(probe_targets(scene))
                batch = collate(self.encoder, items), torch.stack(columns)
            except BaseException as e:  # handed to the training loop, which raises it
                batch = e
            while not self._stop.is_set():
                try:
                    self.queue.put(batch, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set():
                return

    def __iter__(self):
        for _ in range(self.s.steps):
            batch = self.queue.get()
            if isinstance(batch, BaseException):
                raise RuntimeError("rendering a training batch failed") from batch
            yield batch

    def close(self) -> None:
        self._stop.set()


def encode_set(encoder: Encoder, question_set: list[tuple[scenes.Scene, list[scenes.Question]]]):
    """A question set (scenes.question_set) as [(pixels [3, S, S], questions of that scene)]."""
    return [(encoder.pixels(scene), questions) for scene, questions in question_set]


def held_out_sets(encoder: Encoder, seed: int, val_scenes: int, test_scenes: int):
    """Encoded validation and test sets, and every held-out layout (training skips them)."""
    test = scenes.split_scenes("test", test_scenes, seed, FRAME_W, FRAME_H)
    val = scenes.split_scenes("val", val_scenes, seed, FRAME_W, FRAME_H, {s.key for s in test})
    keys = {s.key for s in test} | {s.key for s in val}
    return (encode_set(encoder, scenes.question_set(val, seed, "val")),
            encode_set(encoder, scenes.question_set(test, seed, "test")), keys)
