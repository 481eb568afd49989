"""The organisms' shared word-level tokenizer: every word the world's captions and questions use."""

from __future__ import annotations

from ..world.scene import COLOURS, SHAPES, SIZES
from .tokenizer import word_tokenizer

WORDS = [
    "a", "an", "the", "photo", "of", "and", "on", "left", "right", "is", "are", "there", "what", "colour", "shape",
    "object", "objects", "how", "many", "yes", "no", "one", "two", "three", "?", *COLOURS, *SHAPES, *SIZES,
    "answer", ":",  # appended, so the clip organism's ids stay what they were
]


def world_tokenizer(model_max_length: int = 32):
    return word_tokenizer(WORDS, model_max_length=model_max_length)
