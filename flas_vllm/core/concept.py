"""The concept-text contract shared by every path: how a concept becomes token ids."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

INFERENCE_CONCEPT_LEN = 64
"""Concepts are truncated to 64 tokens at inference whatever `concept_max_len` says (spec 6):
`concept_max_len` in config.json is a training argument the original's generator ignores."""

_warned: set[int] = set()


def inference_concept_len(config_max_len: int | None) -> int:
    """The concept length used at inference (64); warns once when the checkpoint config differs."""
    if config_max_len is not None and config_max_len != INFERENCE_CONCEPT_LEN and config_max_len not in _warned:
        _warned.add(config_max_len)
        logger.warning(
            "FLAS checkpoint config: concept_max_len = %d is a training argument; concepts are truncated "
            "to %d tokens at inference, as the original does", config_max_len, INFERENCE_CONCEPT_LEN,
        )
    return INFERENCE_CONCEPT_LEN


def tokenize_concept(tokenizer, concept: str, max_len: int = INFERENCE_CONCEPT_LEN) -> list[int]:
    """Base tokenizer, special tokens ON (Gemma's `<bos>` first), right-truncated to max_len, no EOS.

    `<bos>` counts toward max_len, so 63 text tokens survive at the default 64.
    """
    ids = tokenizer(concept, truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    if len(ids) > 1 and eos is not None and ids[-1] == eos:
        ids = ids[:-1]  # tokenizers that append EOS: the encoder never sees it
    return list(ids)
