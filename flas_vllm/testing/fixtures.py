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
from typing import Callable, Iterator

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

from flas_vllm.testing.tokenizer import (
    BOS_ID, EOS_ID, EOT_ID, GEMMA2_CHAT_TEMPLATE, MAX_POSITIONS, PAD_ID, SPECIAL_TOKENS, VOCAB_SIZE, _build_tokenizer,
)


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
    "max_position_embeddings": MAX_POSITIONS,
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

from flas_vllm.testing.lm_training import (
    DEFAULT_TRAIN_STEPS, TRAIN_ROWS, _BATCH_SIZE, _LOSS_ON_PROMPT, _LR, _MAX_LEN, _MIN_RESPONSE_TOKENS,
    _RESPONSE_WORDS, _WARMUP, _build_threads, _torch_threads, _train, _training_sequences,
)



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
    return build_atomically(out, lambda tmp: _build_into(tmp, seed=seed, train_steps=train_steps), out.name)


def build_atomically(out: pathlib.Path, build: Callable[[pathlib.Path], object], prefix: str) -> pathlib.Path:
    """`build(tmp)` in a sibling temp directory renamed into place at the end: an interrupted build never
    leaves a half-written result where a loader would pick it up."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{prefix}.build-", dir=out.parent))
    try:
        build(tmp)
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

