"""Tiny, deterministic Gemma-2 chat model built at run time.

There is no model hub on test machines, yet the steering runtime has to be
exercised end to end (HF reference vs. vLLM) on a model that has every
Gemma-2 quirk that matters for correctness: sliding-window and global layers
alternating, attention- and final-logit soft-capping, ``query_pre_attn_scalar``
different from ``head_dim``, tied embeddings, a ``<bos>`` added by the
tokenizer and Gemma's chat template with ``<start_of_turn>``/``<end_of_turn>``.

The model is trained for a few hundred steps so greedy decoding is confident:
comparisons between two implementations are then not dominated by near-ties
whose order flips with the last float bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Iterator

__all__ = [
    "FIXTURE_VERSION",
    "TINY_GEMMA2_CONFIG",
    "TRAIN_ROWS",
    "GEMMA2_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "build_tiny_gemma2",
    "ensure_tiny_gemma2",
    "fixture_cache_dir",
    "make_fixture",
]

# Bump whenever anything below changes what gets built (tokenizer, config,
# training recipe, file layout): cached fixtures carrying another version are
# rebuilt instead of silently reused.
FIXTURE_VERSION = 1

MARKER_FILE = ".flas_fixture.json"

# Gemma's id order for the first special tokens, so code that hard-codes
# pad=0 / eos=1 / bos=2 (as Gemma checkpoints do) behaves the same here.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PAD_ID, EOS_ID, BOS_ID, UNK_ID, SOT_ID, EOT_ID = range(len(SPECIAL_TOKENS))

GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

VOCAB_SIZE = 1536

# Keyword arguments for ``transformers.Gemma2Config``. head_dim 32 is the
# smallest size vLLM's CPU attention accepts; sliding_window 32 is shorter
# than real chat prompts so the local/global distinction is actually tested;
# query_pre_attn_scalar 48 != head_dim catches code that scales by head_dim.
TINY_GEMMA2_CONFIG: dict = {
    "architectures": ["Gemma2ForCausalLM"],
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 1024,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pad_token_id": PAD_ID,
    "eos_token_id": EOS_ID,
    "bos_token_id": BOS_ID,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "attention_bias": False,
    "attention_dropout": 0.0,
    "query_pre_attn_scalar": 48,
    "sliding_window": 32,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "dtype": "float32",
}

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


def fixture_cache_dir() -> pathlib.Path:
    """Where built fixtures live, shared by every test process on the machine."""
    root = os.environ.get("FLAS_VLLM_CACHE")
    path = pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "flas-vllm"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load_alpaca() -> list[dict]:
    """The bundled AlpacaEval rows: the only text corpus available offline."""
    from importlib import resources

    try:
        text = resources.files("flas_vllm.data").joinpath("alpaca_eval.json").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):  # running from a bare checkout
        text = (pathlib.Path(__file__).parent / "data" / "alpaca_eval.json").read_text(encoding="utf-8")
    return json.loads(text)


def _recipe_key(seed: int, train_steps: int) -> str:
    """Identity of what a build produces, stored in the marker file."""
    blob = json.dumps(
        {
            "version": FIXTURE_VERSION,
            "config": TINY_GEMMA2_CONFIG,
            "template": GEMMA2_CHAT_TEMPLATE,
            "seed": seed,
            "train_steps": train_steps,
            "recipe": [_BATCH_SIZE, _MAX_LEN, _LR, _WARMUP, list(_RESPONSE_WORDS), _LOSS_ON_PROMPT,
                       _MIN_RESPONSE_TOKENS, TRAIN_ROWS],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- tokenizer


GEMMA_TOKENIZER: dict = {
    "special_tokens": SPECIAL_TOKENS, "bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>",
    "extra": ["<start_of_turn>", "<end_of_turn>"], "template": GEMMA2_CHAT_TEMPLATE,
}


def _build_tokenizer(rows: list[dict], out_dir: pathlib.Path, spec: dict = GEMMA_TOKENIZER):
    """Byte-level BPE on the bundled corpus, dressed up as the family's tokenizer (`spec`; Gemma's default).

    Byte-level means no <unk> ever appears; the post-processor adds the BOS the
    way the real tokenizer does (none where `spec["bos"]` is None, as Qwen's), so a
    chat template that also emits ``{{ bos_token }}`` must be tokenized with
    ``add_special_tokens=False`` exactly as with the real model.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials, bos, extra = spec["special_tokens"], spec["bos"], spec["extra"]
    tk = Tokenizer(models.BPE(unk_token=spec["unk"]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [r["instruction"] for r in rows] + [r["output"] for r in rows]
    tk.train_from_iterator(corpus, trainer)
    if tk.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"BPE produced {tk.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    for i, t in enumerate(specials):
        assert tk.token_to_id(t) == i, (t, tk.token_to_id(t))
    if bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, specials.index(bos))],
        )

    names = {k: spec[k] for k in ("bos", "eos", "pad", "unk") if spec[k] is not None}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        **{f"{k}_token": v for k, v in names.items()},
        additional_special_tokens=extra,
        padding_side="left",
        chat_template=spec["template"],
        model_max_length=TINY_GEMMA2_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(out_dir)

    # transformers 5 writes tokenizer_class "TokenizersBackend", keeps the
    # template only in chat_template.jinja and drops special_tokens_map.json.
    # Add the classic spellings too so readers expecting the 4.x layout (and
    # anything that parses tokenizer_config.json directly) still work.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(
        tokenizer_class="PreTrainedTokenizerFast",
        chat_template=spec["template"],
        add_bos_token=bos is not None,
        add_eos_token=False,
        additional_special_tokens=extra,
        padding_side="left",
    )
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    special_map = {**{f"{k}_token": v for k, v in names.items()}, "additional_special_tokens": extra}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

    # Hand back the tokenizer as a consumer will see it after loading.
    return AutoTokenizer.from_pretrained(out_dir)


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
    """Plain AdamW with a fixed, seeded batch order: same seed, same weights."""
    import math

    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=_LR, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < _WARMUP:
            return (step + 1) / _WARMUP
        frac = (step - _WARMUP) / max(1, steps - _WARMUP)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(steps):
        if len(order) < _BATCH_SIZE:
            order += torch.randperm(len(seqs), generator=gen).tolist()
        batch = [seqs[i] for i in order[:_BATCH_SIZE]]
        del order[:_BATCH_SIZE]
        width = max(len(s) for s, _ in batch)
        ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for r, (s, n_prompt) in enumerate(batch):  # right padding: positions stay 0..len-1
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
            start = 1 if _LOSS_ON_PROMPT else n_prompt
            labels[r, start : len(s)] = ids[r, start : len(s)]
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


# --------------------------------------------------------------------------- build


def _write_generation_config(out_dir: pathlib.Path) -> None:
    """Stop on <end_of_turn> as well as <eos>, like Gemma-2-it checkpoints."""
    gen = {
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, EOT_ID],
        "pad_token_id": PAD_ID,
        "do_sample": False,
    }
    try:
        import transformers

        gen["transformers_version"] = transformers.__version__
    except Exception:  # pragma: no cover
        pass
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _save_model(model, out_dir: pathlib.Path) -> None:
    """safetensors in fp32; transformers 5 dropped the safe_serialization flag."""
    import inspect

    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    try:
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        hf_logging, bars = None, False
    try:
        model.save_pretrained(out_dir, **kwargs)
    finally:
        if hf_logging is not None and bars:
            hf_logging.enable_progress_bar()
    if not (out_dir / "model.safetensors").exists():
        raise RuntimeError(f"expected {out_dir / 'model.safetensors'} after save_pretrained")


def _build_into(out_dir: pathlib.Path, *, seed: int, train_steps: int) -> dict:
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    t0 = time.perf_counter()
    rows = _load_alpaca()
    tok = _build_tokenizer(rows, out_dir)
    assert len(tok) == VOCAB_SIZE

    config = Gemma2Config(**TINY_GEMMA2_CONFIG)
    threads = _build_threads()
    with _torch_threads(threads):
        torch.manual_seed(seed)
        model = Gemma2ForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
        seqs = _training_sequences(rows, tok)
        losses = _train(model, seqs, seed=seed, steps=train_steps)
    model = model.to(torch.float32)
    _save_model(model, out_dir)
    _write_generation_config(out_dir)  # after save_pretrained, which writes its own

    tail = losses[-20:] or [float("nan")]
    curve = [round(sum(losses[i : i + 20]) / len(losses[i : i + 20]), 4) for i in range(0, len(losses), 20)]
    info = {
        "version": FIXTURE_VERSION,
        "key": _recipe_key(seed, train_steps),
        "seed": seed,
        "train_steps": train_steps,
        "final_loss": sum(tail) / len(tail),
        "loss_curve_per_20_steps": curve,
        "build_seconds": round(time.perf_counter() - t0, 2),
        "torch_threads": threads,
    }
    # Written last: its presence means the directory is complete.
    (out_dir / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def build_tiny_gemma2(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    train_steps: int = DEFAULT_TRAIN_STEPS,
    overwrite: bool = False,
) -> pathlib.Path:
    """Build the tiny chat model into ``out_dir`` (about a minute on 2 idle cores, far longer on a busy CPU).

    The build happens in a sibling temp directory that is renamed into place
    at the end, so an interrupted build never leaves a half-written model
    where a loader would pick it up.
    """
    out = pathlib.Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        _build_into(tmp, seed=seed, train_steps=train_steps)
        # mkdtemp makes the dir 0700 and safetensors writes 0600: make the
        # shared cache readable by other users' test runs.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def make_fixture(out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """Entry point for ``flas-vllm make-fixture DIR``: the default recipe."""
    return build_tiny_gemma2(out_dir, seed=seed, overwrite=overwrite)


def _replace_dir(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is moved aside first, then removed."""
    if dst.exists():
        trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.rename(dst, trash / "x")
        os.rename(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(src, dst)


def _is_complete(path: pathlib.Path, key: str) -> bool:
    try:
        info = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return info.get("version") == FIXTURE_VERSION and info.get("key") == key


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """Exclusive inter-process lock (POSIX), so concurrent test sessions build the fixture once."""
    import fcntl

    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_tiny_gemma2(name: str = "tiny-gemma2") -> pathlib.Path:
    """Path to the cached default fixture, building it on first use.

    Concurrent callers (pytest-xdist workers, several test sessions) wait on
    a file lock instead of each spending a minute building the same thing.
    """
    cache = fixture_cache_dir()
    path = cache / name
    key = _recipe_key(0, DEFAULT_TRAIN_STEPS)
    if _is_complete(path, key):
        return path
    with _file_lock(cache / f".{name}.lock"):
        if not _is_complete(path, key):  # somebody else may have built it meanwhile
            # Holding the lock, any leftover build dir belongs to a killed process.
            for stale in [*cache.glob(f".{name}.build-*"), *cache.glob(f".{name}.old-*")]:
                shutil.rmtree(stale, ignore_errors=True)
            build_tiny_gemma2(path, seed=0, train_steps=DEFAULT_TRAIN_STEPS, overwrite=True)
    return path

