"""The concept-text contract shared by every path: how a concept becomes token ids."""

from __future__ import annotations


def tokenize_concept(tokenizer, concept: str, max_len: int = 64) -> list[int]:
    """Base tokenizer, special tokens ON (Gemma's `<bos>` first), right-truncated to max_len, no EOS.

    `<bos>` counts toward max_len, so 63 text tokens survive at the default 64.
    """
    ids = tokenizer(concept, truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    if len(ids) > 1 and eos is not None and ids[-1] == eos:
        ids = ids[:-1]  # tokenizers that append EOS: the encoder never sees it
    return list(ids)
