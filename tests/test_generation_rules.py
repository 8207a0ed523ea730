"""Bulk generation runs each request as the original generator does (spec section 6):
the checkpoint's prompt format, the first 512 tokens of the formatted prompt, and its stop rule."""

from __future__ import annotations

import pytest

from flas_vllm.eval.generate import GenerationSettings, Job

LONG_PROMPT = " ".join(f"Describe item number {i} of the long list in detail." for i in range(200))


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def _job(prompt: str, flowtime: float = 1.0) -> Job:
    return Job(concept_id=7, concept="sailing ships", prompt_id=3, prompt=prompt, flowtime=flowtime, seed=11,
               prompt_position=0)


@pytest.mark.parametrize("prompt_format", ["chat", "alpaca"])
def test_formatted_prompt_keeps_its_first_512_tokens(tokenizer, prompt_format):
    from flas_vllm.eval.generate import job_request

    if prompt_format == "chat":
        text = tokenizer.apply_chat_template([{"role": "user", "content": LONG_PROMPT}],
                                             add_generation_prompt=True, tokenize=False)
    else:
        text = f"<bos>### Instruction:\n{LONG_PROMPT}\n\n### Response:\n"
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(full) > 600
    want = tokenizer(text, add_special_tokens=False, truncation=True, max_length=512)["input_ids"]
    ids, _ = job_request(_job(LONG_PROMPT), GenerationSettings(), tokenizer, prompt_format)
    assert ids == want and len(ids) == 512 and ids[0] == tokenizer.bos_token_id
    ids, _ = job_request(_job(LONG_PROMPT), GenerationSettings(max_prompt_tokens=None), tokenizer, prompt_format)
    assert ids == full
    short, _ = job_request(_job("Hi there."), GenerationSettings(), tokenizer, prompt_format)
    assert short == tokenizer(text.replace(LONG_PROMPT, "Hi there."), add_special_tokens=False)["input_ids"]


def test_stop_rule_and_steering_go_with_every_request(tokenizer):
    from flas_vllm.eval.generate import job_request

    _, steered = job_request(_job("Hi."), GenerationSettings(), tokenizer, "chat")
    assert steered.extra_args == {"flas_concept": "sailing ships", "flas_flowtime": 1.0, "flas_stop_rule": "original"}
    _, plain = job_request(_job("Hi.", 0.0), GenerationSettings(stop_rule="vllm"), tokenizer, "chat")
    assert plain.extra_args == {"flas_stop_rule": "vllm"}
    assert steered.seed == 11 and steered.temperature == 1.0


def test_prompt_format_comes_from_the_checkpoint(make_ckpt, tmp_path):
    import json
    import shutil

    from flas_vllm.core.checkpoint import read_checkpoint_config

    src = make_ckpt()
    assert read_checkpoint_config(src).prompt_format == "chat"
    dst = tmp_path / "base-model-ckpt"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "prompt_format": "alpaca"}))
    assert read_checkpoint_config(dst).prompt_format == "alpaca"


def test_alpaca_chat_template_renders_the_alpaca_prompt(tokenizer):
    """The chat route of a base-model checkpoint (serve, FlasLLM.chat) sends exactly the alpaca ids."""
    from flas_vllm.core.prompts import ALPACA_CHAT_TEMPLATE, format_prompt

    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name a bird."}],
                                         chat_template=ALPACA_CHAT_TEMPLATE, add_generation_prompt=True,
                                         tokenize=False)
    assert text == "<bos>### Instruction:\nName a bird.\n\n### Response:\n"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == format_prompt(tokenizer, "Name a bird.", "alpaca")


@pytest.mark.parametrize("change, words", [
    (dict(n_steps=0), "--n-steps"),
    (dict(stop_rule="eot"), "--stop-rule"),
    (dict(max_prompt_tokens=0), "--max-prompt-tokens"),
])
def test_bad_generation_options_name_the_flag(tmp_path, change, words):
    import dataclasses

    from flas_vllm.eval.pipeline import GenerateSpec, validate_spec

    concepts = tmp_path / "c.txt"
    concepts.write_text("sailing\n")
    prompts = tmp_path / "p.json"
    prompts.write_text('[{"instruction": "Hi."}]')
    settings = GenerationSettings(**{k: v for k, v in change.items() if k != "n_steps"})
    spec = GenerateSpec(model="m", checkpoint="c", concepts=str(concepts), prompts=str(prompts), num_prompts=1,
                        flowtimes=[1.0], settings=settings, n_steps=change.get("n_steps"))
    with pytest.raises(ValueError, match=words):
        validate_spec(spec)
    assert validate_spec(dataclasses.replace(spec, settings=GenerationSettings(), n_steps=None))
