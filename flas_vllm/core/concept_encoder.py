"""A checkpoint's own concept encoder (`concept_enc` in a training `.pt`, spec section 4).

Released checkpoints encode concepts with the base model's embedding, layers 0-1 and
final norm. Training checkpoints that fine-tuned the encoder carry those weights
themselves; the original then builds the encoder from the base model's config, casts
it to the flow's dtype (its RoPE inverse frequencies included) and loads them. Both
paths (engine and transformers) run such an encoder through `encode_with_decoder`.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch

from flas_vllm.core.errors import FlasCheckpointError

ENCODER_LAYERS = 2


def build_own_encoder(base_config: Any, state: Mapping[str, torch.Tensor], dtype: torch.dtype,
                      device: torch.device | str = "cpu"):
    """A transformers text decoder of ENCODER_LAYERS layers holding the checkpoint's encoder weights."""
    from transformers import AutoConfig, AutoModel  # lazy: transformers is heavy

    raw = base_config.to_dict() if hasattr(base_config, "to_dict") else dict(base_config)
    for key in ("architectures", "flas", "auto_map"):
        raw.pop(key, None)
    raw["num_hidden_layers"] = ENCODER_LAYERS
    if isinstance(raw.get("layer_types"), list):
        raw["layer_types"] = raw["layer_types"][:ENCODER_LAYERS]
    model_type = raw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **raw)
    cfg._attn_implementation = "eager"  # the original's encoder: eager attention, softcap on
    with torch.device("cpu"):
        encoder = AutoModel.from_config(cfg, dtype=torch.float32)
    encoder = encoder.to(dtype)  # casts the rotary inverse frequencies as well, as the original does
    expected = set(encoder.state_dict())
    got = set(state)
    if expected - got or got - expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise FlasCheckpointError(
            "flas checkpoint: 'concept_enc' does not match a "
            f"{ENCODER_LAYERS}-layer {model_type} encoder for this base model"
            + (f"; missing {missing[0]!r} (+{len(missing) - 1} more)" if missing else "")
            + (f"; unexpected {extra[0]!r} (+{len(extra) - 1} more)" if extra else "")
        )
    for name, tensor in encoder.state_dict().items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise FlasCheckpointError(
                f"flas checkpoint: 'concept_enc' tensor {name!r} has shape {list(state[name].shape)}, "
                f"expected {list(tensor.shape)} for this base model"
            )
    encoder.load_state_dict(dict(state), strict=True)
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.to(device).eval()


def _layer_rope(decoder, h: torch.Tensor, pos: torch.Tensor, index: int):
    """(cos, sin) for decoder layer `index`: its own layer type's RoPE where the rotary module keeps
    one per type (Gemma-3: layers 0-1 are local, theta 1e4), else the one RoPE of the model."""
    types = getattr(decoder.config, "layer_types", None)
    if types and "layer_type" in inspect.signature(decoder.rotary_emb.forward).parameters:
        return decoder.rotary_emb(h, pos, types[index])
    return decoder.rotary_emb(h, pos)


def token_ids_on(device: torch.device | str, ids: Sequence[int]) -> torch.Tensor:
    """A concept's token ids [Lc] on `device`, without waiting for the device. On a GPU a blocking copy from
    pageable memory waits for every kernel already queued (the previous engine step's, under vLLM's async
    scheduling); a non-blocking one from pinned memory does not, and PyTorch's pinned-memory cache keeps
    the block until the copy has run."""
    host = torch.tensor(list(ids), dtype=torch.long)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@torch.inference_mode()
def encode_with_decoder(decoder, ids: Sequence[int]) -> torch.Tensor:
    """Embedding + layers 0-1 with a plain causal mask (no window) + final norm -> [Lc, H].

    `decoder` is a transformers text decoder (the base model's `.model`, or an own encoder);
    its embedding applies Gemma's sqrt(H) scale.
    """
    device = decoder.embed_tokens.weight.device
    h = decoder.embed_tokens(token_ids_on(device, ids)[None])
    pos = torch.arange(len(ids), device=device)[None]
    n = len(ids)
    mask = torch.full((n, n), torch.finfo(h.dtype).min, dtype=h.dtype, device=device).triu(1)
    for i, layer in enumerate(decoder.layers[:ENCODER_LAYERS]):
        pos_emb = _layer_rope(decoder, h, pos, i)
        out = layer(h, position_embeddings=pos_emb, attention_mask=mask[None, None], position_ids=pos)
        h = out[0] if isinstance(out, tuple) else out
    return decoder.norm(h)[0]
