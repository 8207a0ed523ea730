"""FLAS on a Hugging Face model of any registered family, the way the original runs it: a forward
hook on decoder layer L of the text decoder (`model.model.language_model` for multimodal Gemma-3).

This path is the parity oracle for the vLLM model and the "original
implementation" baseline in benchmarks. It batches several prompts for ONE
concept (rows may have different flowtimes), left-pads them, uses real-token
positions, and keeps one dense KV cache per (Euler step, block) across decode
steps. The flow math is `flas_vllm.core.flow`; nothing here re-implements it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from flas_vllm.core.checkpoint import FlasCheckpoint, load_checkpoint
from flas_vllm.core.concept import inference_concept_len, tokenize_concept
from flas_vllm.core.concept_encoder import build_own_encoder, encode_with_decoder
from flas_vllm.core.config import FlowGeometry
from flas_vllm.core.families import text_config
from flas_vllm.core.flow import SingleConceptKV, dense_causal_attention, euler_dt, integrate
from flas_vllm.core.prompts import format_prompt


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each chosen token
    text: str = ""
    finish_reason: str = "length"
    top2_margins: list[float] = field(default_factory=list)  # top-1 minus top-2 logprob per step


class StreamState:
    """What the current forward call covers: shared by the hook and the flow caches."""

    positions: torch.Tensor  # [B, T]
    valid: torch.Tensor  # [B, T] bool, False on left padding


class DenseFlowCache:
    """Causal self-attention for one (Euler step, block), cached across forward calls."""

    def __init__(self, state: StreamState, g: FlowGeometry, scale: float, use_cache: bool):
        self.state = state
        self.g = g
        self.scale = scale
        self.use_cache = use_cache
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        g = self.g
        b, t = q.shape[:2]
        q = q.view(b, t, g.num_heads, g.head_dim)
        k = k.view(b, t, g.num_kv_heads, g.head_dim)
        v = v.view(b, t, g.num_kv_heads, g.head_dim)
        valid = self.state.valid
        if self.use_cache and self.k is not None:
            k = torch.cat([self.k, k], dim=1)
            v = torch.cat([self.v, v], dim=1)
            valid = torch.cat([self.valid, valid], dim=1)
        if self.use_cache:
            self.k, self.v, self.valid = k, v, valid
        past = k.shape[1] - t
        causal = torch.ones(t, k.shape[1], dtype=torch.bool, device=q.device).tril(diagonal=past)
        allowed = causal[None] & valid[:, None, :]
        out = dense_causal_attention(q, k, v, allowed, self.scale, g.attn_logit_softcapping)
        return out.reshape(b, t, -1)


class HFSteerer:
    """Steers a transformers causal LM with a FLAS checkpoint (eager attention, softcap on)."""

    def __init__(
        self,
        model,
        tokenizer,
        checkpoint: FlasCheckpoint | str | Path,
        *,
        n_steps: int | None = None,
    ):
        for cfg in {id(c): c for c in (model.config, text_config(model.config))}.values():
            if getattr(cfg, "_attn_implementation", "eager") != "eager":
                cfg._attn_implementation = "eager"  # sdpa would drop the attention softcap
        self.model = model.eval()
        self.tokenizer = tokenizer
        if not isinstance(checkpoint, FlasCheckpoint):
            checkpoint = load_checkpoint(checkpoint, model.config)
        self.checkpoint = checkpoint
        self.cfg = checkpoint.config
        self.geometry = FlowGeometry.from_base_config(model.config)
        self.device = next(model.parameters()).device
        self.flow = checkpoint.build_flow(self.geometry, self.device)
        self.n_steps = n_steps or self.cfg.n_steps
        self.concept_len = inference_concept_len(self.cfg.concept_max_len)
        self.decoder = text_decoder(model)
        self.encoder = self.decoder
        if checkpoint.concept_encoder is not None:
            self.encoder = build_own_encoder(text_config(model.config), checkpoint.concept_encoder,
                                             checkpoint.dtype, self.device)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._concept_cache: dict[str, list] = {}

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, checkpoint, *, dtype=torch.float32, n_steps=None,
                        device="cpu") -> "HFSteerer":
        from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: transformers is heavy

        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, attn_implementation="eager"
        ).to(device)
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        return cls(model, tok, checkpoint, n_steps=n_steps)

    # -- concept encoder ------------------------------------------------------------

    def encode_concept(self, concept: str) -> torch.Tensor:
        """Embedding + layers 0-1 (plain causal, softcap) + final norm -> c [Lc, H] in the flow dtype.

        The base model's own layers, or the checkpoint's own encoder (`concept_enc`) when it has one.
        """
        ids = tokenize_concept(self.tokenizer, concept, self.concept_len)
        return encode_with_decoder(self.encoder, ids).to(self.flow.dtype)

    def concept_kv(self, concept: str) -> SingleConceptKV:
        if concept not in self._concept_cache:
            with torch.inference_mode():
                self._concept_cache[concept] = self.flow.project_concept(self.encode_concept(concept))
        return SingleConceptKV(self._concept_cache[concept], self.geometry.attn_logit_softcapping)

    # -- generation -------------------------------------------------------------------

    def prompt_ids(self, prompt: str) -> list[int]:
        return format_prompt(self.tokenizer, prompt, self.cfg.prompt_format)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        concept: str | None,
        flowtimes: float | Sequence[float],
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        use_cache: bool = True,
        ignore_eos: bool = False,
        n_steps: int | None = None,
        stop_rule: str = "vllm",
    ) -> list[Generation]:
        """Generate for each prompt; row i is steered toward `concept` at flowtimes[i] (0 = unsteered).

        `n_steps`: Euler steps for this call (default: the steerer's). `stop_rule`: "vllm" stops at
        every generation_config EOS id, "original" only at the tokenizer's EOS (spec 6).
        """
        n_steps = n_steps or self.n_steps
        eos_ids = self.eos_ids if stop_rule == "vllm" else {self.tokenizer.eos_token_id}
        rows = [list(p) if not isinstance(p, str) else self.prompt_ids(p) for p in prompts]
        b = len(rows)
        times = [float(flowtimes)] * b if isinstance(flowtimes, (int, float)) else [float(t) for t in flowtimes]
        if len(times) != b:
            raise ValueError(f"flowtimes: expected {b} values (one per prompt), got {len(times)}")
        steered_rows = [concept is not None and t != 0.0 for t in times]
        concept_kv = self.concept_kv(concept) if any(steered_rows) else None
        dt = torch.stack([euler_dt(t, n_steps, self.flow.dtype) for t in times]).to(self.device)
        steered = torch.tensor(steered_rows, device=self.device)

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        valid = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=self.device)
        gen = torch.Generator(device=self.device)
        if seed is not None:
            gen.manual_seed(seed)

        outs = [Generation(prompt_token_ids=r, token_ids=[], logprobs=[]) for r in rows]
        done = [False] * b
        state = StreamState()
        caches = self._new_caches(state, use_cache, n_steps)
        past = None
        from transformers import DynamicCache  # lazy: transformers is heavy

        if use_cache:
            past = DynamicCache(config=self.model.config)
        step_ids, step_valid = ids, valid
        all_ids, all_valid = ids, valid
        hook_ctx = self._hook(state, caches, concept_kv, dt, steered, n_steps) if concept_kv is not None else contextlib.nullcontext()
        with hook_ctx:
            for _ in range(max_new_tokens):
                positions = (all_valid.long().cumsum(-1) - 1).clamp(min=0)
                positions = positions[:, -step_ids.shape[1]:]
                state.positions, state.valid = positions, step_valid
                out = self.model(
                    input_ids=step_ids,
                    attention_mask=all_valid.long(),
                    position_ids=positions,
                    past_key_values=past,
                    use_cache=use_cache,
                )
                logits = out.logits[:, -1].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                nxt = self._pick(logits, logprobs, temperature, top_p, gen)
                top2 = logprobs.topk(2, dim=-1).values
                for i in range(b):
                    if done[i]:
                        continue
                    tok = int(nxt[i])
                    outs[i].token_ids.append(tok)
                    outs[i].logprobs.append(float(logprobs[i, tok]))
                    outs[i].top2_margins.append(float(top2[i, 0] - top2[i, 1]))
                    if tok in eos_ids and not ignore_eos:
                        done[i] = True
                        outs[i].finish_reason = "stop"
                if all(done):
                    break
                new = nxt[:, None]
                new_valid = torch.ones(b, 1, dtype=torch.bool, device=self.device)
                all_ids = torch.cat([all_ids, new], dim=1)
                all_valid = torch.cat([all_valid, new_valid], dim=1)
                if use_cache:
                    past = out.past_key_values
                    step_ids, step_valid = new, new_valid
                else:
                    step_ids, step_valid = all_ids, all_valid
                    caches = self._new_caches(state, use_cache, n_steps)
                    if concept_kv is not None:
                        self._active_caches[:] = caches
        for o in outs:
            o.text = self.tokenizer.decode(o.token_ids, skip_special_tokens=True)
        return outs

    @staticmethod
    def _pick(logits, logprobs, temperature, top_p, gen) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=gen)[:, 0]

    def _new_caches(self, state: StreamState, use_cache: bool, n_steps: int) -> list[list[DenseFlowCache | None]]:
        return [
            [
                DenseFlowCache(state, self.geometry, self.flow.self_attn_scale, use_cache)
                if self.flow.uses_self_attention else None
                for _ in range(self.cfg.num_blocks)
            ]
            for _ in range(n_steps)
        ]

    @contextlib.contextmanager
    def _hook(self, state, caches, concept_kv, dt, steered, n_steps):
        self._active_caches = caches  # a list object the hook reads, replaced in place on recompute
        layer = self.decoder.layers[self.cfg.layer]

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            h = hidden.to(self.flow.dtype)
            h = integrate(self.flow, h, dt[:, None].expand(h.shape[:2]), n_steps, state.positions,
                          concept_kv, self._active_caches)
            new = torch.where(steered[:, None, None], h.to(hidden.dtype), hidden)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = layer.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def text_decoder(model):
    """The decoder whose layers are steered: the language model of a multimodal model, else `.model`."""
    inner = model.model
    return getattr(inner, "language_model", None) or inner


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids
