"""A word-level tokenizer built offline with `tokenizers`: the organisms' tokenizer (through `vocab.py`) and the
tiny test models' (`mmlens.testing` re-exports it). Nothing here needs a hub download.

Its template frames every text as `<s> ... </s>`: a prompt ends in `</s>` (see `prompts.py` for what that means for
where the vlm organism's answer is read).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
EXTRA_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

WORDS = (
    "a an the photo of picture image what colour color shape is are there in on left right top bottom "
    "red green blue yellow purple orange cyan white black gray grey "
    "square circle triangle cross star diamond small large big how many objects object yes no "
    "and it to answer question describe one two three zero , . ? :"
).split()


def word_tokenizer(words: list[str] | None = None, model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with `<s> ... </s>` framing and the VLM image tokens as specials.

    Ids: the specials first (`SPECIAL_TOKENS + EXTRA_SPECIAL`), then `words` (default `WORDS`) in order, so a
    vocabulary that only appends words keeps every earlier id.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab_words = SPECIAL_TOKENS + EXTRA_SPECIAL + list(dict.fromkeys(words or WORDS))
    vocab = {w: i for i, w in enumerate(vocab_words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=model_max_length,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>", *EXTRA_SPECIAL]})
    return tok
