"""How the tiny fixture model is trained: its recipe (part of the cache key) and the training loop."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from flas_vllm.testing.tokenizer import PAD_ID

# Training recipe (part of the cache identity, see _recipe_key).
#
# The model memorizes (instruction -> first 30-40 words of the answer) for the
# first TRAIN_ROWS AlpacaEval rows, in file order: the same rows the AxBench
# protocol walks through first, so tests using those prompts get confident,
# text-like greedy continuations (top1-top2 logprob margin ~6 nats). Rows whose
# chat prompt is longer than _MAX_LEN - _MIN_RESPONSE_TOKENS are skipped.
# Training on all 805 rows with the same budget was tried: the model stays
# near ties (mean margin < 1 nat) and babbles, which defeats the purpose.
TRAIN_ROWS = 128
DEFAULT_TRAIN_STEPS = 300
_BATCH_SIZE = 16
_MAX_LEN = 96
_LR = 3e-3
_WARMUP = 30
_RESPONSE_WORDS = (30, 40)
_LOSS_ON_PROMPT = False  # loss on answer tokens only: capacity goes to what gets generated
_MIN_RESPONSE_TOKENS = 24


# --------------------------------------------------------------------------- training data


def _training_sequences(rows: list[dict], tok) -> list[tuple[list[int], int]]:
    """Chat-formatted (instruction, truncated answer) pairs: (token ids, prompt length).

    Answers are cut to 30-40 words. A cut answer is not closed with
    ``<end_of_turn>`` (the cut is artificial), so the model learns to keep
    producing prose instead of stopping after a sentence; answers that fit
    whole keep their end-of-turn so the stop token is learned too.
    """
    lo, hi = _RESPONSE_WORDS
    seqs = []
    for i, row in enumerate(rows[:TRAIN_ROWS]):
        words = row["output"].split()
        n = lo + i % (hi - lo + 1)
        response = " ".join(words[:n])
        text = tok.apply_chat_template(
            [
                {"role": "user", "content": row["instruction"]},
                {"role": "assistant", "content": response},
            ],
            tokenize=False,
        )
        if len(words) > n:
            text = text.removesuffix("<end_of_turn>\n")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": row["instruction"]}], add_generation_prompt=True, tokenize=False
        )
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert text.startswith(prompt) and ids[:n_prompt] == tok(prompt, add_special_tokens=False)["input_ids"]
        if n_prompt > _MAX_LEN - _MIN_RESPONSE_TOKENS:
            continue  # no room left for the answer, which is what the model is trained on
        seqs.append((ids[:_MAX_LEN], n_prompt))
    return seqs


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Set torch threads for the build only; callers keep their own setting."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _build_threads() -> int:
    """Torch threads for training: all usable cores unless $FLAS_VLLM_FIXTURE_THREADS says otherwise.

    The thread count changes float rounding, so weights are bit-identical only
    between builds with the same count. On a CPU shared with other busy
    processes, 1 thread is also faster (measured 1.7x) than oversubscribed 2.
    """
    env = os.environ.get("FLAS_VLLM_FIXTURE_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _train(model, seqs: list[tuple[list[int], int]], *, seed: int, steps: int) -> list[float]:
    """Plain AdamW with a fixed, seeded batch order (testing/training.py): same seed, same weights."""
    from flas_vllm.testing.training import right_padded, train

    def loss_of(batch, _gen):
        ids, valid, labels = right_padded([(s, 1 if _LOSS_ON_PROMPT else n) for s, n in batch], PAD_ID)
        return model(input_ids=ids, attention_mask=valid.long(), labels=labels).loss

    return train(model, model.parameters(), seqs, seed=seed, steps=steps, batch_size=_BATCH_SIZE, lr=_LR,
                 warmup=_WARMUP, loss_of=loss_of)
