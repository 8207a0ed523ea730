"""The tiny Gemma-2 fixture must look like Gemma-2 to every consumer.

Everything else in the suite trusts this model to carry Gemma-2's quirks and
to decode confidently; these tests pin both down. The one expensive build is
shared with the rest of the suite through ``ensure_tiny_gemma2()``'s cache.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from flas_vllm.fixtures import tiny_gemma2 as fixtures
from flas_vllm.fixtures.tiny_gemma2 import (
    FIXTURE_VERSION,
    GEMMA2_CHAT_TEMPLATE,
    MARKER_FILE,
    TINY_GEMMA2_CONFIG,
    build_tiny_gemma2,
    ensure_tiny_gemma2,
)


@pytest.fixture(scope="module")
def model_dir() -> pathlib.Path:
    return ensure_tiny_gemma2()


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _chat(tok, text: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)


# --------------------------------------------------------------------------- tokenizer


def test_files_present(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", MARKER_FILE]:
        assert f in names, f
    marker = json.loads((model_dir / MARKER_FILE).read_text())
    assert marker["version"] == FIXTURE_VERSION


def test_special_token_ids_follow_gemma(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [4, 5]
    assert len(tok) == TINY_GEMMA2_CONFIG["vocab_size"]
    assert tok.padding_side == "left"
    # Turn markers are atomic even inside running text.
    ids = tok("a<start_of_turn>b<end_of_turn>c", add_special_tokens=False).input_ids
    assert 4 in ids and 5 in ids
    assert tok.convert_ids_to_tokens(ids).count("<start_of_turn>") == 1


def test_tokenizer_adds_bos_not_eos(tok):
    ids = tok("hi").input_ids
    assert ids[0] == tok.bos_token_id == 2
    assert ids.count(2) == 1 and tok.eos_token_id not in ids
    assert tok("hi", add_special_tokens=False).input_ids[0] != 2


def test_chat_template_is_gemma2(tok):
    assert tok.chat_template == GEMMA2_CHAT_TEMPLATE
    s = _chat(tok, "Hi")
    assert s == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok(s, add_special_tokens=False).input_ids
    assert ids[0] == 2 and ids.count(2) == 1
    assert ids[1] == 4 and ids.count(4) == 2 and ids.count(5) == 1
    two = tok.apply_chat_template(
        [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Yo"}], tokenize=False
    )
    assert two == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
                                tokenize=False)


def test_decode_skips_specials_like_gemma(tok):
    ids = tok(_chat(tok, "Hello there"), add_special_tokens=False).input_ids
    assert tok.decode(ids) == "<bos><start_of_turn>user\nHello there<end_of_turn>\n<start_of_turn>model\n"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHello there\nmodel\n"
    text = "Some words, 123 and émojis ✓ \n\t spaced"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text  # byte-level: lossless


def test_generation_config_stops_on_end_of_turn(model_dir):
    from transformers import GenerationConfig

    gc = GenerationConfig.from_pretrained(model_dir)
    assert gc.eos_token_id == [1, 5]
    assert gc.bos_token_id == 2 and gc.pad_token_id == 0


def test_vllm_tokenizer_loader(model_dir):
    """vLLM resolves tokenizers its own way; make sure it ends up with the same one."""
    vt = pytest.importorskip("vllm.tokenizers")
    t = vt.get_tokenizer(str(model_dir))
    assert t.bos_token_id == 2 and t.eos_token_id == 1
    assert t("hi").input_ids[0] == 2
    assert t.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                 tokenize=False).startswith("<bos><start_of_turn>user\nHi<end_of_turn>\n")


# --------------------------------------------------------------------------- config


def test_config_has_gemma2_quirks(model_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    assert cfg.model_type == "gemma2" and cfg.architectures == ["Gemma2ForCausalLM"]
    assert cfg.query_pre_attn_scalar != cfg.head_dim
    assert cfg.head_dim == 32 and cfg.hidden_size == 128
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.sliding_window < 40
    assert cfg.layer_types == ["sliding_attention", "full_attention"] * (cfg.num_hidden_layers // 2)
    assert cfg.attn_logit_softcapping == 50.0 and cfg.final_logit_softcapping == 30.0
    assert cfg.tie_word_embeddings
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (0, 1, 2)
    raw = json.loads((model_dir / "config.json").read_text())
    assert raw.get("dtype", raw.get("torch_dtype")) == "float32"


def test_long_chat_prompts_exceed_sliding_window(tok):
    """Sliding-window layers only differ from global ones on prompts longer than the window,
    so the memorized (confident) rows must include such prompts."""
    rows = fixtures.load_alpaca()[: fixtures.TRAIN_ROWS]
    window = TINY_GEMMA2_CONFIG["sliding_window"]
    budget = fixtures.MAX_LEN - fixtures.MIN_RESPONSE_TOKENS  # longest prompt trained on
    lengths = [len(tok(_chat(tok, r["instruction"]), add_special_tokens=False).input_ids) for r in rows]
    assert sum(40 < n <= budget for n in lengths) >= 10
    assert budget > 2 * window
    assert max(lengths) > 2 * window


# --------------------------------------------------------------------------- model


CONFIDENCE_PROMPTS = [0, 1, 2]  # AlpacaEval rows, in file order like the AxBench protocol
# Measured ~6 nats on these prompts (min step ~4); an untrained model gives
# ~0.4 and an under-trained one (loss ~0.7) ~1.5, so 3.0 means "memorized".
MIN_MEAN_MARGIN = 3.0


def test_hf_greedy_generation_is_confident(tok, hf_model):
    """Greedy steps should be far from ties, so two correct implementations agree token for token."""
    rows = fixtures.load_alpaca()
    margins = []
    for i in CONFIDENCE_PROMPTS:
        ids = tok(_chat(tok, rows[i]["instruction"]), add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                                    do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert out.sequences.shape[1] == ids.shape[1] + 20
        text = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        assert sum(c.isalpha() for c in text) > 20, text  # prose, not a stream of specials
        for logits in out.logits:
            top = torch.log_softmax(logits[0].float(), -1).topk(2).values
            margins.append((top[0] - top[1]).item())
    mean = sum(margins) / len(margins)
    assert mean > MIN_MEAN_MARGIN, (mean, margins)
    assert sum(m < 0.5 for m in margins) <= len(margins) // 10, margins


def test_left_padding_matches_unpadded(tok, hf_model):
    """The tokenizer pads left (for batched generation); logits must not depend on it."""
    rows = fixtures.load_alpaca()
    prompts = [_chat(tok, "Hi"), _chat(tok, rows[0]["instruction"])]
    batch = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0] == tok.pad_token_id
    with torch.no_grad():
        padded = hf_model(**batch).logits[:, -1]
        for r, p in enumerate(prompts):
            ids = tok(p, add_special_tokens=False, return_tensors="pt").input_ids
            alone = hf_model(input_ids=ids).logits[0, -1]
            torch.testing.assert_close(padded[r], alone, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- building and caching


def _tensors(path: pathlib.Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_build_is_deterministic(tmp_path):
    a = build_tiny_gemma2(tmp_path / "a", seed=0, train_steps=3)
    b = build_tiny_gemma2(tmp_path / "b", seed=0, train_steps=3)
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    for f in ["tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"]:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    # ... and the seed matters, so the comparison above is not vacuous.
    c = build_tiny_gemma2(tmp_path / "c", seed=1, train_steps=3)
    tc = _tensors(c)
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)


def test_build_refuses_to_clobber(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_gemma2(tmp_path / "x", train_steps=1)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_ensure_rebuilds_only_incomplete_or_stale(tmp_path, monkeypatch):
    """Cache logic, with the slow builder replaced by a stub that counts calls."""
    monkeypatch.setenv("FLAS_VLLM_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_build(out_dir, *, seed=0, train_steps=0, overwrite=False):
        out = pathlib.Path(out_dir)
        calls.append(out)
        out.mkdir(parents=True, exist_ok=True)
        info = {"version": FIXTURE_VERSION, "key": fixtures._recipe_key(seed, train_steps)}
        (out / MARKER_FILE).write_text(json.dumps(info))
        return out

    monkeypatch.setattr(fixtures, "build_tiny_gemma2", fake_build)
    p = fixtures.ensure_tiny_gemma2("t")
    assert p == tmp_path / "cache" / "t" and len(calls) == 1
    assert fixtures.ensure_tiny_gemma2("t") == p and len(calls) == 1  # cached

    (p / MARKER_FILE).unlink()  # interrupted build: no marker
    fixtures.ensure_tiny_gemma2("t")
    assert len(calls) == 2

    info = json.loads((p / MARKER_FILE).read_text())
    info["version"] = FIXTURE_VERSION - 1  # recipe changed since
    (p / MARKER_FILE).write_text(json.dumps(info))
    fixtures.ensure_tiny_gemma2("t")
    assert len(calls) == 3
