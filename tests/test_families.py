"""FLAS on Qwen3, Llama-3.1 and Gemma-3 (flas-families.md) against plain-torch references written here.

Per family: the flow (norm formula, q/k norms, RoPE variant, scales) equals the spec reference;
the transformers path steers layer L with exactly that flow on the family's own concept encoding;
prompts and concept tokens follow the family's tokenizer; bad combinations are refused at load.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flas_vllm.core.config import FlasConfig, FlowGeometry
from flas_vllm.core.errors import FlasCheckpointError
from flas_vllm.fixtures.family_models import FAMILY_FIXTURES
from flas_vllm.fixtures.checkpoints import randomize_flow
from flas_vllm.core.flow import FlowFunction, SingleConceptKV, euler_dt, integrate
from flas_vllm.core.rope import rope_inv_freq
from tests.test_flow_quirks import full_causal_core, max_diff, r_attention, r_linear, r_time_embed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL_TYPES = {"qwen3": "qwen3", "llama": "llama", "gemma3": "gemma3_text"}
VARIANTS = {"qwen3": dict(num_blocks=2, layer=2), "llama": dict(num_blocks=1, layer=1),
            "gemma3": dict(num_blocks=1, layer=3, disable_self_attn=True)}


def base_config(family: str) -> dict:
    return {**FAMILY_FIXTURES[family]["config"], "model_type": MODEL_TYPES[family]}


# ---------------------------------------------------------------------------
# the reference, from flas-families.md section 2 (no library code)


def ref_norm(x, w, eps, family):
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if family == "gemma3":  # Gemma: fp32 x^ * (1 + w), one rounding
        return (n * (1.0 + w.float())).to(x.dtype)
    return w * n.to(x.dtype)  # Qwen3/Llama: round x^ first, then scale in the flow dtype


def ref_inv_freq(family: str, d: int) -> torch.Tensor:
    """Element by element: Qwen3 theta 1e6; Llama-3.1 llama3 bands; Gemma-3 global theta 1e6 / 8."""
    cfg = base_config(family)["rope_parameters"]
    cfg = cfg.get("full_attention", cfg)
    out = []
    for i in range(0, d, 2):
        f = 1.0 / cfg["rope_theta"] ** (i / d)
        if cfg["rope_type"] == "linear":
            f /= cfg["factor"]
        elif cfg["rope_type"] == "llama3":
            wl, orig = 2 * math.pi / f, cfg["original_max_position_embeddings"]
            if wl > orig / cfg["low_freq_factor"]:
                f /= cfg["factor"]
            elif wl >= orig / cfg["high_freq_factor"]:
                s = (orig / wl - cfg["low_freq_factor"]) / (cfg["high_freq_factor"] - cfg["low_freq_factor"])
                f = (1 - s) * f / cfg["factor"] + s * f
        out.append(f)
    return torch.tensor(out, dtype=torch.float32)


def ref_rope(x, pos, inv, dtype):
    inv = inv.to(dtype).to(torch.float32)  # the flow's frequencies are rounded to its dtype
    ang = pos.to(torch.float32)[:, None] * inv[None]
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    d = x.shape[-1]
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1) * sin


def ref_flow(P, family, g, h, t, pos, c, inv):
    eps, d, nh, nkv, dt_ = g.rms_norm_eps, g.head_dim, g.num_heads, g.num_kv_heads, h.dtype
    act = F.silu if family != "gemma3" else (lambda x: F.gelu(x, approximate="tanh"))
    h_in, te = h, r_time_embed(t, P)
    i = 0
    while f"blocks.{i}.cross_gate" in P:
        b = f"blocks.{i}."
        norm = lambda name, x: ref_norm(x, P[b + name + ".weight"], eps, family)  # noqa: E731
        h = h + te
        x = norm("pre_cross_norm", h)
        q = norm("cross_attn.q_norm", r_linear(x, P, b + "cross_attn.q_proj").view(-1, nh, d))
        k = norm("cross_attn.k_norm", r_linear(c, P, b + "cross_attn.k_proj").view(-1, nkv, d))
        v = r_linear(c, P, b + "cross_attn.v_proj").view(-1, nkv, d)
        q, k = ref_rope(q, pos, inv, dt_), ref_rope(k, torch.arange(c.shape[0]), inv, dt_)
        o = r_attention(q, k, v, scale=d ** -0.5, cap=None).reshape(h.shape[0], -1)
        h = h + P[b + "cross_gate"] * norm("post_cross_norm", r_linear(o, P, b + "cross_attn.o_proj"))
        if b + "self_attn_gate" in P:
            x = norm("pre_sa_norm", h)
            q = r_linear(x, P, b + "self_attn.q_proj").view(-1, nh, d)
            k = r_linear(x, P, b + "self_attn.k_proj").view(-1, nkv, d)
            if family == "qwen3":  # Qwen3Attention's own q/k norms, before RoPE
                q, k = norm("self_attn.q_norm", q), norm("self_attn.k_norm", k)
            q, k = ref_rope(q, pos, inv, dt_), ref_rope(k, pos, inv, dt_)
            v = r_linear(x, P, b + "self_attn.v_proj").view(-1, nkv, d)
            causal = torch.ones(len(pos), len(pos), dtype=torch.bool).tril()
            o = r_attention(q, k, v, scale=d ** -0.5, cap=None, allowed=causal).reshape(h.shape[0], -1)
            h = h + P[b + "self_attn_gate"] * norm("post_sa_norm", r_linear(o, P, b + "self_attn.o_proj"))
        x = norm("pre_mlp_norm", h)
        x = r_linear(act(r_linear(x, P, b + "gate_proj")) * r_linear(x, P, b + "up_proj"), P, b + "down_proj")
        h = h + P[b + "mlp_gate"] * norm("post_mlp_norm", x)
        i += 1
    return h - h_in


def ref_integrate(P, family, g, h, flowtime, n, pos, c, inv):
    dt = euler_dt(flowtime, n, h.dtype)
    for k in range(n):
        h = h + dt * ref_flow(P, family, g, h, dt * k, pos, c, inv)
    return h


# ---------------------------------------------------------------------------
# flow math per family


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", sorted(MODEL_TYPES))
def test_flow_matches_family_reference(family, dtype):
    g = FlowGeometry.from_base_config(base_config(family))
    cfg = FlasConfig(**{k: v for k, v in VARIANTS[family].items()})
    flow = randomize_flow(FlowFunction(g, cfg), 3, norm_std=0.3).to(dtype).eval()
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(9, g.hidden_size, generator=gen).to(dtype)
    c = torch.randn(6, g.hidden_size, generator=gen).to(dtype)
    pos = torch.arange(300, 309)  # far enough out that the RoPE variant matters
    cores = [[full_causal_core(g, flow.self_attn_scale) if flow.uses_self_attention else None] * cfg.num_blocks] * 2
    P = {k: v.detach() for k, v in flow.state_dict().items()}
    with torch.no_grad():
        got = integrate(flow, h, euler_dt(1.5, 2, dtype).expand(9), 2, pos,
                        SingleConceptKV(flow.project_concept(c), None), cores)
        want = ref_integrate(P, family, g, h, 1.5, 2, pos, c, ref_inv_freq(family, g.head_dim))
        plain_rope = ref_integrate(P, family, g, h, 1.5, 2, pos, c,
                                   1.0 / g.rope_theta ** (torch.arange(0, g.head_dim, 2) / g.head_dim))
    tol = 1e-4 if dtype == torch.float32 else 0.06
    scale = max(1.0, want.float().abs().max().item())
    assert max_diff(got, want) <= tol * scale
    if family != "qwen3" and dtype == torch.float32:  # Llama's llama3 bands and Gemma-3's linear /8 are not the plain RoPE
        assert max_diff(got, plain_rope) > 10 * tol * scale


@pytest.mark.parametrize("family", sorted(MODEL_TYPES))
def test_norm_formula_follows_the_family(family):
    """Same tensor names, different formula: Gemma-3 (1 + w) in fp32, Qwen3/Llama w * bf16(x^)."""
    from flas_vllm.core.flow import flow_norm

    g = FlowGeometry.from_base_config(base_config(family))
    norm = flow_norm(g, 16).to(torch.bfloat16)
    assert float(norm.weight[0]) == (0.0 if family == "gemma3" else 1.0)  # the identity of each formula
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert torch.equal(norm(x), ref_norm(x, norm.weight.detach(), g.rms_norm_eps, family))


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])
def test_rope_frequencies_match_transformers(family):
    """The flow's inverse frequencies before rounding equal transformers' own RoPE init for that config."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    spec = FAMILY_FIXTURES[family]
    hf_cfg = getattr(transformers, spec["config_class"])(**spec["config"])
    g = FlowGeometry.from_base_config(hf_cfg)
    kind = dict(g.rope_scaling)["rope_type"]
    layer_type = {"layer_type": "full_attention"} if family == "gemma3" else {}
    if kind == "default":
        want = 1.0 / g.rope_theta ** (torch.arange(0, g.head_dim, 2, dtype=torch.int64).float() / g.head_dim)
    else:
        want, _ = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu", **layer_type)
    assert torch.allclose(rope_inv_freq(g.head_dim, g.rope_theta, g.rope_scaling), want, rtol=1e-6, atol=0)
    assert torch.allclose(ref_inv_freq(family, g.head_dim), want, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------
# the transformers path on each family's tiny model


@pytest.fixture(scope="module")
def family_model():
    from flas_vllm.fixtures.family_models import ensure_family_model

    return ensure_family_model


def steerer_for(model_dir, **variant):
    from flas_vllm.fixtures.checkpoints import ensure_flas_checkpoint
    from flas_vllm.reference.hf import HFSteerer

    return HFSteerer.from_pretrained(model_dir, ensure_flas_checkpoint(model_dir, **variant))


def ref_encode(steerer, family, concept):
    """Embedding (x bf16-free model-dtype sqrt(H) for Gemma) + layers 0-1 with their own RoPE + final norm."""
    from flas_vllm.reference.hf import text_decoder

    dec = text_decoder(steerer.model)
    cfg = dec.config
    ids = steerer.tokenizer(concept, truncation=True, max_length=64)["input_ids"]
    h = dec.embed_tokens.weight[ids][None]
    if family == "gemma3":
        h = h * torch.tensor(cfg.hidden_size ** 0.5, dtype=h.dtype)
    rope = cfg.rope_parameters.get("sliding_attention", cfg.rope_parameters)  # Gemma-3 layers 0-1 are local
    assert family != "gemma3" or cfg.layer_types[:2] == ["sliding_attention"] * 2
    inv = rope_inv_freq(cfg.head_dim, rope["rope_theta"], tuple(rope.items()))
    ang = torch.arange(len(ids), dtype=torch.float32)[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)[None]
    n = len(ids)
    mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
    for layer in dec.layers[:2]:
        out = layer(h, position_embeddings=(emb.cos(), emb.sin()), attention_mask=mask,
                    position_ids=torch.arange(n)[None])
        h = out[0] if isinstance(out, tuple) else out
    return dec.norm(h)[0]


@pytest.mark.parametrize("family", sorted(VARIANTS))
def test_hf_steering_matches_reference(family_model, family):
    """Layer L's steered output equals the reference flow on the raw output, prefill and decode."""
    from flas_vllm.reference.hf import text_decoder

    model_dir = family_model(family)
    steerer = steerer_for(model_dir, **VARIANTS[family])
    concept = "the ocean and sailing ships"
    with torch.no_grad():
        c = ref_encode(steerer, family, concept)
        assert max_diff(steerer.encode_concept(concept), c) <= 1e-5 * max(1.0, c.abs().max().item())
    steerer.concept_kv(concept)  # encoded (and cached) before the hooks: L may be an encoder layer
    layers = text_decoder(steerer.model).layers
    raw, steered = [], []
    L = steerer.cfg.layer
    h1 = layers[L].register_forward_hook(lambda m, a, out: raw.append((out[0] if isinstance(out, tuple) else out).clone()))
    h2 = layers[L + 1].register_forward_pre_hook(
        lambda m, args, kw: steered.append((args[0] if args else kw["hidden_states"]).clone()), with_kwargs=True)
    try:
        steerer.generate(["Describe the water cycle for a child."], concept, 1.5, max_new_tokens=3, ignore_eos=True)
    finally:
        h1.remove()
        h2.remove()
    raw_all, got = torch.cat(raw, 1)[0], torch.cat(steered, 1)[0]
    g = steerer.geometry
    P = {k: v.detach() for k, v in steerer.flow.state_dict().items()}
    with torch.no_grad():
        want = ref_integrate(P, family, g, raw_all, 1.5, steerer.n_steps, torch.arange(raw_all.shape[0]), c,
                             ref_inv_freq(family, g.head_dim))
    assert max_diff(got, want) <= 1e-4 * max(1.0, want.abs().max().item())
    assert max_diff(got, raw_all) > 1e-2  # it did steer


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_disable_self_attn_checkpoint_loads_and_steers(family_model, family):
    model_dir = family_model(family)
    steerer = steerer_for(model_dir, num_blocks=1, layer=1, disable_self_attn=True)
    assert not any("self_attn" in n for n in steerer.flow.state_dict())
    plain, steered = (steerer.generate(["Name three birds."], "love", t, max_new_tokens=8, ignore_eos=True)[0]
                      for t in (0.0, 4.0))
    assert plain.token_ids != steered.token_ids


# ---------------------------------------------------------------------------
# tokens: concept BOS and prompt formats per family


def test_concept_tokens_and_prompts_per_family(family_model):
    from transformers import AutoTokenizer

    from flas_vllm.core.concept import tokenize_concept
    from flas_vllm.core.prompts import format_prompt_text

    toks = {f: AutoTokenizer.from_pretrained(family_model(f)) for f in MODEL_TYPES}
    words = " ".join(["sailing ships on the ocean"] * 40)
    q, ll, g3 = (tokenize_concept(toks[f], words) for f in ("qwen3", "llama", "gemma3"))
    assert len(q) == len(ll) == len(g3) == 64
    assert q[0] != toks["qwen3"].convert_tokens_to_ids("<|endoftext|>")  # no BOS: 64 text tokens
    assert q == toks["qwen3"](words, add_special_tokens=False)["input_ids"][:64]
    assert ll[0] == toks["llama"].bos_token_id and g3[0] == toks["gemma3"].bos_token_id
    qwen_chat = format_prompt_text(toks["qwen3"], "Hi", "chat")
    assert qwen_chat.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # non-thinking, as the original
    assert "Today Date: 26 Jul 2024" in format_prompt_text(toks["llama"], "Hi", "chat")
    assert format_prompt_text(toks["qwen3"], "Hi", "alpaca") == "### Instruction:\nHi\n\n### Response:\n"
    assert format_prompt_text(toks["llama"], "Hi", "alpaca").startswith("<|begin_of_text|>### Instruction:")


# ---------------------------------------------------------------------------
# bad input, refused at load with the model type, the checkpoint and the mismatch


def test_checkpoint_of_another_family_is_refused(family_model):
    from flas_vllm.core.checkpoint import load_checkpoint
    from flas_vllm.fixtures.checkpoints import ensure_flas_checkpoint

    qwen_ckpt = ensure_flas_checkpoint(family_model("qwen3"), num_blocks=1, layer=1)
    with pytest.raises(FlasCheckpointError, match=r"flas\.safetensors.*has shape.*llama base model"):
        load_checkpoint(qwen_ckpt, base_config("llama"))


def test_qwen3_self_attention_norms_on_a_llama_base_are_refused(family_model, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from flas_vllm.core.checkpoint import load_checkpoint
    from flas_vllm.fixtures.checkpoints import ensure_flas_checkpoint

    d = tmp_path / "c"
    shutil.copytree(ensure_flas_checkpoint(family_model("llama"), num_blocks=1, layer=1), d)
    t = load_file(str(d / "flas.safetensors"))
    t["blocks.0.self_attn.q_norm.weight"] = torch.ones(32)
    save_file(t, str(d / "flas.safetensors"))
    with pytest.raises(FlasCheckpointError, match=r"self_attn\.q_norm.*llama base model.*another model family"):
        load_checkpoint(d, base_config("llama"))


def test_gemma3_checkpoint_with_self_attention_is_refused(family_model):
    from flas_vllm.core.checkpoint import load_checkpoint
    from flas_vllm.fixtures.checkpoints import make_random_flas_checkpoint

    with pytest.raises(FlasCheckpointError, match=r"disable_self_attn.*gemma3_text"):
        load_checkpoint(make_random_flas_checkpoint(
            __import__("tempfile").mkdtemp(), family_model("qwen3"), layer=1), base_config("gemma3"))


@pytest.mark.parametrize("family", sorted(MODEL_TYPES))
def test_layer_out_of_range_names_the_model_type(family_model, family, tmp_path):
    import json
    import shutil

    from flas_vllm.core.checkpoint import load_checkpoint
    from flas_vllm.fixtures.checkpoints import ensure_flas_checkpoint

    d = tmp_path / "c"
    shutil.copytree(ensure_flas_checkpoint(family_model(family), **VARIANTS[family]), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "layer": 40}))
    n = base_config(family)["num_hidden_layers"]
    with pytest.raises(FlasCheckpointError, match=rf"'layer' = 40.*{MODEL_TYPES[family]} base model.*0\.\.{n - 1}"):
        load_checkpoint(d, base_config(family))


def test_multimodal_gemma3_config_is_unwrapped_to_its_text_decoder():
    from flas_vllm.core.families import architecture_for, family_of

    text = base_config("gemma3")
    multimodal = {"model_type": "gemma3", "text_config": text, "vision_config": {"model_type": "siglip_vision_model"}}
    assert FlowGeometry.from_base_config(multimodal) == FlowGeometry.from_base_config(text)
    assert family_of(multimodal).name == "gemma3"
    assert architecture_for(multimodal) == "FlasGemma3ForConditionalGeneration"
    assert architecture_for(text) == "FlasGemma3ForCausalLM"
    assert architecture_for(base_config("qwen3")) == "FlasQwen3ForCausalLM"
    assert architecture_for({"model_type": "gemma2"}) == "FlasGemma2ForCausalLM"
