"""FLAS checkpoint configuration (`config.json`) and the base-model geometry it must fit.

The training arguments saved next to a checkpoint decide the flow's shape; the
base model's config decides the tensor sizes. Both are read here, once, so that
every path (vLLM model, transformers path, checkpoint validation) agrees.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from flas_vllm.core.errors import FlasCheckpointError, FlasConfigError
from flas_vllm.core.families import family_of, text_config

# Defaults the original code applies when a key is missing (spec section 1).
CONFIG_DEFAULTS: dict[str, Any] = {
    "model_id": "google/gemma-2-2b-it",
    "layer": 20,
    "num_blocks": 2,
    "n_steps": 2,
    "concept_max_len": 64,
    "disable_cross_attn": False,
    "disable_self_attn": False,
    "disable_mlp": False,
    "prompt_format": "chat",
    "T_min": 0.5,
    "T_max": 2.0,
}

PROMPT_FORMATS = ("chat", "alpaca")


@dataclass(frozen=True)
class FlasConfig:
    """The inference-relevant part of a FLAS checkpoint's training arguments."""

    model_id: str = CONFIG_DEFAULTS["model_id"]
    layer: int = CONFIG_DEFAULTS["layer"]
    num_blocks: int = CONFIG_DEFAULTS["num_blocks"]
    n_steps: int = CONFIG_DEFAULTS["n_steps"]
    concept_max_len: int = CONFIG_DEFAULTS["concept_max_len"]
    disable_cross_attn: bool = False
    disable_self_attn: bool = False
    disable_mlp: bool = False
    prompt_format: str = "chat"
    T_min: float = 0.5
    T_max: float = 2.0
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "config.json") -> "FlasConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values: dict[str, Any] = {}
        for key in known:
            value = raw.get(key, CONFIG_DEFAULTS[key])
            values[key] = _coerce(key, value, source)
        extra = {k: v for k, v in raw.items() if k not in known}
        cfg = cls(**values, extra=extra)
        cfg._check_self(source)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    def _check_self(self, source: str) -> None:
        if self.num_blocks < 1:
            raise FlasCheckpointError(f"{source}: 'num_blocks' must be >= 1, got {self.num_blocks}")
        if self.n_steps < 1:
            raise FlasCheckpointError(f"{source}: 'n_steps' must be >= 1, got {self.n_steps}")
        if self.concept_max_len < 1:
            raise FlasCheckpointError(
                f"{source}: 'concept_max_len' must be >= 1, got {self.concept_max_len}"
            )
        if self.prompt_format not in PROMPT_FORMATS:
            raise FlasCheckpointError(
                f"{source}: 'prompt_format' must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}"
            )


def _coerce(key: str, value: Any, source: str) -> Any:
    expected = type(CONFIG_DEFAULTS[key])
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise FlasCheckpointError(f"{source}: {key!r} must be a boolean, got {value!r}")
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FlasCheckpointError(f"{source}: {key!r} must be an integer, got {value!r}")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FlasCheckpointError(f"{source}: {key!r} must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise FlasCheckpointError(f"{source}: {key!r} must be a string, got {value!r}")
    return value


ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class FlowGeometry:
    """Sizes and constants the flow inherits from its base model's (text) config and family."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_hidden_layers: int
    rms_norm_eps: float
    rope_theta: float
    query_pre_attn_scalar: float
    attn_logit_softcapping: float | None
    hidden_activation: str
    attention_bias: bool
    model_type: str = "gemma2"
    norm_offset: bool = True  # Gemma (1 + w) norms; False: plain w * x^ (families.Family.norm_offset)
    self_attn_qk_norm: bool = False
    # RoPE scaling of the flow's frequencies: sorted (key, value) pairs with at least rope_type
    rope_scaling: tuple[tuple[str, Any], ...] = (("rope_type", "default"),)

    @classmethod
    def from_base_config(cls, base: Any) -> "FlowGeometry":
        family = family_of(base)
        tc = text_config(base)
        get = tc.get if isinstance(tc, Mapping) else lambda k, d=None: getattr(tc, k, d)
        hidden = int(get("hidden_size"))
        heads = int(get("num_attention_heads"))
        head_dim = int(get("head_dim", None) or hidden // heads)
        rope_theta, scaling = _flow_rope(get, family.rope_layer_type)
        softcap = get("attn_logit_softcapping", None)
        return cls(
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads", None) or heads),
            head_dim=head_dim,
            num_hidden_layers=int(get("num_hidden_layers")),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            query_pre_attn_scalar=float(get("query_pre_attn_scalar", None) or head_dim),
            attn_logit_softcapping=None if softcap is None else float(softcap),
            hidden_activation=str(
                get("hidden_activation", None) or get("hidden_act", None) or "gelu_pytorch_tanh"
            ),
            attention_bias=bool(get("attention_bias", False)),
            model_type=str(get("model_type")),
            norm_offset=family.norm_offset,
            self_attn_qk_norm=family.self_attn_qk_norm,
            rope_scaling=scaling,
        )


def _flow_rope(get, layer_type: str | None) -> tuple[float, tuple[tuple[str, Any], ...]]:
    """(theta, scaling) of the flow's RoPE: `rope_parameters` (per layer type where the family says so),
    else the legacy `rope_theta` + `rope_scaling` keys."""
    params = get("rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), Mapping):
        params = params[layer_type]
    if "rope_theta" in params:
        theta, scaling = params["rope_theta"], dict(params)
    else:
        theta, scaling = get("rope_theta", None) or 10000.0, dict(get("rope_scaling", None) or {})
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if kind not in ROPE_TYPES:
        raise FlasCheckpointError(
            f"base model config ({get('model_type')}): rope_type {kind!r} is not supported by the FLAS flow "
            f"(supported: {', '.join(ROPE_TYPES)})")
    keep = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    items = {k: float(v) for k, v in scaling.items() if k in keep and kind != "default"}
    return theta, tuple(sorted({"rope_type": kind, **items}.items()))


def check_against_base(cfg: FlasConfig, geometry: FlowGeometry) -> None:
    """Refuse a checkpoint whose layer cannot exist in this base model."""
    n = geometry.num_hidden_layers
    if not 0 <= cfg.layer < n:
        raise FlasCheckpointError(
            f"config.json: 'layer' = {cfg.layer} is out of range for a {geometry.model_type} base model with "
            f"{n} decoder layers (valid: 0..{n - 1})"
        )
    family = family_of({"model_type": geometry.model_type})
    if not cfg.disable_self_attn and not family.self_attn_supported:
        raise FlasCheckpointError(
            f"config.json: 'disable_self_attn' is false, but FLAS on {geometry.model_type} has no flow "
            "self-attention (the original trains these checkpoints with --disable-self-attn only)"
        )
    if n < 2:
        raise FlasCheckpointError(
            "base model config: the concept encoder needs decoder layers 0 and 1, "
            f"but num_hidden_layers = {n}"
        )


ENGINE_OPTION_DEFAULTS: dict[str, Any] = {
    "n_steps": None,
    "max_n_steps": None,
    "max_concepts": 64,
    "max_pinned": 16,
    "max_flowtime": 8.0,
    "max_concept_bytes": 2048,
    "graph_path": False,
    "flow_graphs": "traced",
}
# What a FULL CUDA graph holds of the flow (engine/graph_modes.py): "traced", the flow compiled into the
# graph on every token; "bucketed", the flow's op captured once per steered bucket (engine/graph_buckets.py).
FLOW_GRAPHS_CHOICES = ("traced", "bucketed")


@dataclass(frozen=True)
class FlasEngineOptions:
    """Engine-wide FLAS options, carried to every vLLM process as `hf_overrides["flas"]`."""

    checkpoint: str
    # every default is ENGINE_OPTION_DEFAULTS' (the one place the CLI, server, REPL and playground read)
    n_steps: int | None = ENGINE_OPTION_DEFAULTS["n_steps"]  # None: the checkpoint config's
    max_n_steps: int | None = ENGINE_OPTION_DEFAULTS["max_n_steps"]  # flas_n_steps limit; None: n_steps
    max_concepts: int = ENGINE_OPTION_DEFAULTS["max_concepts"]  # distinct concepts in flight; more wait
    max_pinned: int = ENGINE_OPTION_DEFAULTS["max_pinned"]  # preloaded concepts, in slots of their own
    max_flowtime: float = ENGINE_OPTION_DEFAULTS["max_flowtime"]
    max_concept_bytes: int = ENGINE_OPTION_DEFAULTS["max_concept_bytes"]
    # Force the CUDA-graph-safe flow path (flow on every token, torch.where for unsteered ones, full-length
    # concept gather) where vLLM would take the eager skip path: how CI runs the path GPUs capture.
    graph_path: bool = ENGINE_OPTION_DEFAULTS["graph_path"]
    # What FULL CUDA graphs (and the forced graph path) run of the flow: FLOW_GRAPHS_CHOICES. "bucketed" is
    # opt-in until it has run on a GPU (no GPU with vLLM was at hand when it was built).
    flow_graphs: str = ENGINE_OPTION_DEFAULTS["flow_graphs"]

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> "FlasEngineOptions":
        """Parse and check `hf_overrides["flas"]`; raises FlasConfigError naming the option and its limit.

        Parsed once per process for each distinct mapping (every vLLM process and the front end's
        per-request path call this; the result is cached)."""
        try:
            # the type is part of the key: True == 1 and 8 == 8.0, but they do not validate alike
            items = tuple(sorted((k, type(v).__name__, v) for k, v in raw.items())) if isinstance(raw, Mapping) else None
            hash(items)
        except TypeError:  # an unhashable value (a list, a dict): parse it uncached, to name the error
            items = None
        return _options_from_items(items) if items is not None else cls._parse(raw)

    @classmethod
    def _parse(cls, raw: Mapping[str, Any] | None) -> "FlasEngineOptions":
        if not isinstance(raw, Mapping) or not raw.get("checkpoint"):
            raise FlasConfigError(
                "hf_overrides['flas']['checkpoint'] is required: the FLAS checkpoint "
                "(file, directory or Hub repo id) to steer with"
            )
        unknown = sorted(set(raw) - set(ENGINE_OPTION_DEFAULTS) - {"checkpoint"})
        if unknown:
            raise FlasConfigError(
                f"hf_overrides['flas']: unknown option {unknown[0]!r}; accepted: "
                f"checkpoint, {', '.join(ENGINE_OPTION_DEFAULTS)}"
            )
        opts = cls(checkpoint=str(raw["checkpoint"]), **{k: raw.get(k, v) for k, v in ENGINE_OPTION_DEFAULTS.items()})
        if opts.n_steps is not None and (not isinstance(opts.n_steps, int) or opts.n_steps < 1):
            raise FlasConfigError(f"flas option n_steps must be an integer >= 1, got {opts.n_steps!r}")
        if opts.max_n_steps is not None and (not isinstance(opts.max_n_steps, int) or opts.max_n_steps < 1
                                             or opts.max_n_steps < (opts.n_steps or 1)):
            raise FlasConfigError(
                f"flas option max_n_steps must be an integer >= max(1, n_steps), got {opts.max_n_steps!r}")
        if not isinstance(opts.graph_path, bool):
            raise FlasConfigError(f"flas option graph_path must be a boolean, got {opts.graph_path!r}")
        if opts.flow_graphs not in FLOW_GRAPHS_CHOICES:
            raise FlasConfigError(
                f"flas option flow_graphs must be one of {', '.join(map(repr, FLOW_GRAPHS_CHOICES))}, "
                f"got {opts.flow_graphs!r}")
        if not isinstance(opts.max_concepts, int) or opts.max_concepts < 1:
            raise FlasConfigError(f"flas option max_concepts must be an integer >= 1, got {opts.max_concepts!r}")
        if not isinstance(opts.max_pinned, int) or opts.max_pinned < 0:
            raise FlasConfigError(f"flas option max_pinned must be an integer >= 0, got {opts.max_pinned!r}")
        if not isinstance(opts.max_flowtime, (int, float)) or not 0 < opts.max_flowtime < math.inf:
            raise FlasConfigError(f"flas option max_flowtime must be a finite number > 0, got {opts.max_flowtime!r}")
        return opts

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "FlasEngineOptions":
        raw = getattr(hf_config, "flas", None)
        if raw is not None and not isinstance(raw, Mapping):
            raw = vars(raw)
        return cls.from_mapping(raw)

    def step_limits(self, checkpoint_n_steps: int) -> tuple[int, int]:
        """(default n_steps, max n_steps) of this engine; a checkpoint default above max_n_steps is refused."""
        default = self.n_steps or checkpoint_n_steps
        top = self.max_n_steps or default
        if default > top:
            raise FlasConfigError(
                f"flas option max_n_steps = {top} is below the default n_steps = {default} "
                "(the checkpoint config's); raise max_n_steps or set n_steps")
        return default, top

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=64)
def _options_from_items(items: tuple[tuple[str, str, Any], ...]) -> FlasEngineOptions:
    return FlasEngineOptions._parse({k: v for k, _, v in items})
