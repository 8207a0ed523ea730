"""Tiny deterministic base models of the other FLAS families (Qwen3, Llama-3.1, Gemma-3), built at run time.

Random weights (seeded) with a wide initialisation, so greedy decoding has clear top-1/top-2
margins; the Gemma-2 fixture (`flas_vllm.testing.fixtures`) is the trained one. Each family keeps the
traits that matter for FLAS: its norm and RoPE variant (Llama-3 scaling, Gemma-3's local/global
pair with linear scaling on the global one), head_dim different from hidden/heads (Qwen3),
BOS handling (none for Qwen) and its chat template's shape (Qwen3's `enable_thinking`, Llama-3.1's
fixed system block). head_dim is 32 or 64: vLLM's CPU attention needs one of its sizes.
"""

from __future__ import annotations

import functools
import json
import pathlib

from flas_vllm.testing.fixtures import _load_alpaca
from flas_vllm.testing.tokenizer import GEMMA2_CHAT_TEMPLATE, GEMMA_TOKENIZER, VOCAB_SIZE, _build_tokenizer
from flas_vllm.testing.fixtures import _file_lock, _save_model, build_atomically, fixture_cache_dir

FAMILY_FIXTURE_VERSION = 1

QWEN3_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
LLAMA31_TEMPLATE = (
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n<|eot_id|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_COMMON = {"vocab_size": VOCAB_SIZE, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 1024, "initializer_range": 0.1,
           "attention_bias": False, "attention_dropout": 0.0, "dtype": "float32", "use_cache": True}

# family -> (transformers config class, config kwargs, tokenizer spec, generation_config eos ids)
FAMILY_FIXTURES: dict[str, dict] = {
    "qwen3": {
        "config_class": "Qwen3Config",
        "config": {**_COMMON, "architectures": ["Qwen3ForCausalLM"], "num_hidden_layers": 4, "head_dim": 64,
                   "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
                   "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0},
        "tokenizer": {"special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                      "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "unk": None,
                      "extra": ["<|im_start|>", "<think>", "</think>"], "template": QWEN3_TEMPLATE},
        "generation_eos": [2, 0],
    },
    "llama": {
        "config_class": "LlamaConfig",
        "config": {**_COMMON, "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4, "head_dim": 32,
                   "max_position_embeddings": 16384,
                   "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "mlp_bias": False,
                   "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192},
                   "bos_token_id": 0, "eos_token_id": 4},
        "tokenizer": {"special_tokens": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                         "<|end_header_id|>", "<|eot_id|>"],
                      "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": None, "unk": None,
                      "extra": ["<|start_header_id|>", "<|end_header_id|>"], "template": LLAMA31_TEMPLATE},
        "generation_eos": [1, 4],
    },
    "gemma3": {
        "config_class": "Gemma3TextConfig",
        "config": {**_COMMON, "architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 6, "head_dim": 32,
                   "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                   "query_pre_attn_scalar": 32, "sliding_window": 32,
                   "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
                   "rope_parameters": {
                       "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                   "attn_logit_softcapping": None, "final_logit_softcapping": None,
                   "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0},
        "tokenizer": {**GEMMA_TOKENIZER, "template": GEMMA2_CHAT_TEMPLATE},
        "generation_eos": [1, 5],
    },
}


def build_family_model(family: str, out_dir: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Tokenizer, config, seeded random fp32 weights and generation_config of `family` into out_dir."""
    import torch
    import transformers

    spec = FAMILY_FIXTURES[family]
    _build_tokenizer(_load_alpaca(), out_dir, spec["tokenizer"])
    config = getattr(transformers, spec["config_class"])(**spec["config"])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _save_model(model.eval(), out_dir)
    gen = {"eos_token_id": spec["generation_eos"], "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out_dir


# The multimodal wrapper of a Gemma-3 text decoder, as google/gemma-3-4b-* ship (a tiny SigLIP tower).
GEMMA3_IMAGE_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
GEMMA3_MM = {
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                      "vision_use_head": False},
    "mm_tokens_per_image": 4,
}


def build_gemma3_multimodal(out_dir: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """`Gemma3ForConditionalGeneration` around the tiny Gemma-3 text decoder: config, tokenizer with the
    image tokens, processor files, seeded random fp32 weights (vision tower included)."""
    import torch
    import transformers

    spec = FAMILY_FIXTURES["gemma3"]
    tok_spec = dict(spec["tokenizer"])
    tok_spec["special_tokens"] = [*tok_spec["special_tokens"], *GEMMA3_IMAGE_TOKENS]
    tok_spec["extra"] = [*tok_spec["extra"], *GEMMA3_IMAGE_TOKENS]
    tokenizer = _build_tokenizer(_load_alpaca(), out_dir, tok_spec)
    boi, eoi, image = (tokenizer.convert_tokens_to_ids(t) for t in GEMMA3_IMAGE_TOKENS)
    text = {k: v for k, v in spec["config"].items() if k not in ("architectures", "dtype")}
    config = transformers.Gemma3Config(
        text_config=text, vision_config=GEMMA3_MM["vision_config"], mm_tokens_per_image=GEMMA3_MM["mm_tokens_per_image"],
        boi_token_index=boi, eoi_token_index=eoi, image_token_index=image, initializer_range=0.1,
        architectures=["Gemma3ForConditionalGeneration"], dtype="float32",
    )
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).to(torch.float32)
    _save_model(model.eval(), out_dir)
    size = GEMMA3_MM["vision_config"]["image_size"]
    processor_files = {
        "preprocessor_config.json": {
            "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
            "size": {"height": size, "width": size}, "do_resize": True, "do_rescale": True,
            "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "rescale_factor": 1 / 255, "resample": 2, "do_convert_rgb": True, "do_pan_and_scan": False},
        "processor_config.json": {"processor_class": "Gemma3Processor",
                                  "image_seq_length": GEMMA3_MM["mm_tokens_per_image"]},
    }
    for name, content in processor_files.items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(boi_token=GEMMA3_IMAGE_TOKENS[0], eoi_token=GEMMA3_IMAGE_TOKENS[1], image_token=GEMMA3_IMAGE_TOKENS[2],
               extra_special_tokens={"boi_token": GEMMA3_IMAGE_TOKENS[0], "eoi_token": GEMMA3_IMAGE_TOKENS[1],
                                     "image_token": GEMMA3_IMAGE_TOKENS[2]})
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {"eos_token_id": spec["generation_eos"], "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out_dir


def ensure_family_model(family: str) -> pathlib.Path:
    """The cached tiny model of `family` ("gemma2" is the trained Gemma-2 fixture), built on first use."""
    if family == "gemma2":
        from flas_vllm.testing.fixtures import ensure_tiny_gemma2

        return ensure_tiny_gemma2()
    if family == "gemma3-mm":
        build = build_gemma3_multimodal
    elif family in FAMILY_FIXTURES:
        build = functools.partial(build_family_model, family)
    else:
        raise ValueError(f"no tiny fixture for family {family!r}; known: gemma2, {', '.join(FAMILY_FIXTURES)}, "
                         "gemma3-mm")
    cache = fixture_cache_dir()
    path = cache / f"tiny-{family}-v{FAMILY_FIXTURE_VERSION}"
    if (path / "model.safetensors").exists():
        return path
    with _file_lock(cache / f".tiny-{family}.lock"):
        if not (path / "model.safetensors").exists():
            build_atomically(path, build, f"tiny-{family}")
    return path
