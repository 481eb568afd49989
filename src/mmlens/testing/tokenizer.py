"""The word-level tokenizer of the tiny test models. It lives in the runtime package (the organisms train with it);
this module re-exports it, since tests may depend on runtime code and never the reverse."""

from __future__ import annotations

from ..organisms.tokenizer import EXTRA_SPECIAL, SPECIAL_TOKENS, WORDS, word_tokenizer

__all__ = ["EXTRA_SPECIAL", "SPECIAL_TOKENS", "WORDS", "word_tokenizer"]
