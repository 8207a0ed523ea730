"""Loading released FLAS checkpoints unchanged: a file, a directory, or a Hub repo id.

A checkpoint is validated against the base model before anything runs, so a
wrong layer, a missing tensor or a shape mismatch fails at load time with the
name of the culprit instead of deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from safetensors.torch import load_file, save_file
import torch

from flas_vllm.core.config import CONFIG_DEFAULTS, FlasConfig, FlowGeometry, check_against_base
from flas_vllm.core.errors import FlasCheckpointError
from flas_vllm.core.flow import FlowFunction

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.safetensors", "*.pt", "config.json"]


@dataclass
class FlasCheckpoint:
    """A loaded, validated checkpoint: config, flow tensors (own dtype), optional encoder."""

    config: FlasConfig
    tensors: dict[str, torch.Tensor]
    dtype: torch.dtype
    path: Path
    concept_encoder: dict[str, torch.Tensor] | None = None
    ignored: list[str] = field(default_factory=list)
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        """Content hash of the flow weights: part of every steered prefix-cache key."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.path)
        return self._fingerprint

    def build_flow(self, geometry: FlowGeometry, device: torch.device | str = "cpu", *,
                   load: bool = True) -> FlowFunction:
        """The flow module in the checkpoint's dtype; `load=False` leaves the weights to the caller
        (the vLLM model copies them in `load_weights`, once)."""
        flow = FlowFunction(geometry, self.config).to(device=device, dtype=self.dtype)
        if load:
            flow.load_state_dict(self.tensors, strict=True)
        return flow.eval()


def weights_fingerprint(path: Path) -> str:
    """The fingerprint of a resolved weights file, without loading it (see `resolve_checkpoint`)."""
    return file_sha256(path)[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expected_tensor_shapes(geometry: FlowGeometry, cfg: FlasConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes a checkpoint must hold, derived from the one flow definition."""
    with torch.device("meta"):
        flow = FlowFunction(geometry, cfg)
    return {name: tuple(p.shape) for name, p in flow.state_dict().items()}


def resolve_checkpoint(spec: str | Path) -> Path:
    """A local checkpoint file (.safetensors/.pt), a directory, or a Hub repo id -> the weights file."""
    path = Path(spec).expanduser()
    if not path.exists():
        if isinstance(spec, str) and _REPO_ID.match(spec):
            path = _download_from_hub(spec)
        else:
            raise FlasCheckpointError(f"flas checkpoint: {spec!s} does not exist (file, directory or Hub repo id)")
    if path.is_file():
        if path.suffix not in (".safetensors", ".pt"):
            raise FlasCheckpointError(f"flas checkpoint: {path} is neither a .safetensors nor a .pt file")
        return path
    candidates = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.pt"))
    if not candidates:
        raise FlasCheckpointError(f"flas checkpoint: no .safetensors or .pt file in directory {path}")
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        raise FlasCheckpointError(
            f"flas checkpoint: directory {path} holds several weight files ({names}); pass one file"
        )
    return candidates[0]


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download  # lazy: huggingface_hub, only for checkpoints on the Hub

        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # offline, missing repo, no network: all reported the same way
        raise FlasCheckpointError(
            f"flas checkpoint: could not fetch {repo_id!r} from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). Download it where the Hub is reachable, e.g. "
            f"`huggingface-cli download {repo_id} --local-dir ./{repo_id.split('/')[-1]}`, "
            f"copy that directory here and pass its path instead."
        ) from exc


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict | None, dict | None]:
    """(flow tensors, own concept encoder or None, config embedded in a .pt or None)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), None, None
        except Exception as exc:
            raise FlasCheckpointError(f"flas checkpoint: cannot read {path}: {exc}") from exc
    try:
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FlasCheckpointError(f"flas checkpoint: cannot read {path}: {exc}") from exc
    if isinstance(blob, dict) and blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return dict(blob), None, None  # a bare flow state dict, as the original accepts
    if not isinstance(blob, dict) or "flow_fn" not in blob:
        raise FlasCheckpointError(
            f"flas checkpoint: {path} is a .pt file holding neither a 'flow_fn' state dict nor a bare "
            "state dict of tensors"
        )
    embedded_cfg = blob.get("config") or blob.get("args")
    return dict(blob["flow_fn"]), blob.get("concept_enc"), embedded_cfg if isinstance(embedded_cfg, dict) else None


def _read_config(weights: Path, embedded: dict | None, tensors: Mapping[str, torch.Tensor]) -> FlasConfig:
    cfg_path = weights.parent / "config.json"
    if cfg_path.exists():
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise FlasCheckpointError(f"flas checkpoint: {cfg_path} is not valid JSON: {exc}") from exc
        source = str(cfg_path)
    elif embedded is not None:
        raw, source = embedded, f"{weights.name}['config']"
    else:
        # The original reads config.json if present and falls back to its defaults otherwise.
        # The block structure is read from the tensors instead (a defaulted num_blocks that does
        # not match them would leave a block uninitialised in the original).
        blocks = {int(n.split(".")[1]) for n in tensors if n.startswith("blocks.") and n.split(".")[1].isdigit()}
        raw = {"num_blocks": max(blocks) + 1 if blocks else CONFIG_DEFAULTS["num_blocks"],
               "disable_self_attn": not any(".self_attn." in n for n in tensors)}
        source = f"{weights.name} (no config.json)"
        logger.warning(
            "flas checkpoint: config.json not found next to %s; read from the tensors: %s; "
            "the original's defaults are used for the rest", weights,
            ", ".join(f"{k}={v!r}" for k, v in raw.items()),
        )
    cfg = FlasConfig.from_dict(raw, source=source)
    defaulted = [k for k in CONFIG_DEFAULTS if k not in raw]
    if defaulted:
        logger.warning(
            "flas checkpoint %s: %s not set; using the original's default%s: %s", weights.name,
            ", ".join(defaulted), "s" if len(defaulted) > 1 else "",
            ", ".join(f"{k}={CONFIG_DEFAULTS[k]!r}" for k in defaulted),
        )
    return cfg


def checkpoint_fingerprint(spec: str | Path) -> str:
    """Content hash of the weights file, from its bytes alone (no tensor is loaded)."""
    return weights_fingerprint(resolve_checkpoint(spec))


def read_checkpoint_config(spec: str | Path) -> FlasConfig:
    """Only the checkpoint's config (for front ends that need its prompt format or n_steps)."""
    weights = resolve_checkpoint(spec)
    if (weights.parent / "config.json").exists():
        return _read_config(weights, None, {})
    tensors, _, embedded_cfg = _read_weights(weights)
    return _read_config(weights, embedded_cfg, tensors)


def load_checkpoint(spec: str | Path, base_config: Any) -> FlasCheckpoint:
    """Load and validate a checkpoint against the base model's config (HF config or dict)."""
    weights = resolve_checkpoint(spec)
    tensors, concept_enc, embedded_cfg = _read_weights(weights)
    cfg = _read_config(weights, embedded_cfg, tensors)
    geometry = FlowGeometry.from_base_config(base_config)
    check_against_base(cfg, geometry)
    expected = expected_tensor_shapes(geometry, cfg)

    missing = [n for n in expected if n not in tensors]
    if missing:
        raise FlasCheckpointError(
            f"flas checkpoint {weights.name}: missing tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f" for a {geometry.model_type} base model; config: num_blocks={cfg.num_blocks}, "
            f"disable_self_attn={cfg.disable_self_attn}, disable_cross_attn={cfg.disable_cross_attn}, "
            f"disable_mlp={cfg.disable_mlp}"
        )
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise FlasCheckpointError(
                f"flas checkpoint {weights.name}: tensor {name!r} has shape {list(got)}, "
                f"expected {list(shape)} for this {geometry.model_type} base model (was it trained on another one?)"
            )
    # disable_cross_attn / disable_mlp: the original still builds and stores those modules, and
    # only skips them in the forward pass, so their tensors are expected, not "unknown".
    stored_unused = set(expected_tensor_shapes(
        geometry, dataclasses.replace(cfg, disable_cross_attn=False, disable_mlp=False))) - set(expected)
    ignored = sorted(n for n in tensors if n not in expected and n not in stored_unused)
    foreign = [n for n in ignored if not cfg.disable_self_attn and re.search(r"\.self_attn\.[qk]_norm\.", n)]
    if foreign:  # Qwen3's flow self-attention has q/k norms, no other family's does
        raise FlasCheckpointError(
            f"flas checkpoint {weights.name}: tensor {foreign[0]!r} belongs to a flow self-attention with q/k "
            f"norms, which a {geometry.model_type} base model does not have: the checkpoint was trained on "
            "another model family")
    if ignored:
        logger.warning(
            "flas checkpoint %s: ignoring %d tensor(s) the flow does not use: %s",
            weights.name, len(ignored), ", ".join(ignored[:8]) + (" ..." if len(ignored) > 8 else ""),
        )
    kept = {n: tensors[n] for n in expected}
    dtype = _flow_dtype(kept, weights.name)
    return FlasCheckpoint(
        config=cfg, tensors=kept, dtype=dtype, path=weights, concept_encoder=concept_enc, ignored=ignored
    )


def _flow_dtype(tensors: Mapping[str, torch.Tensor], name: str) -> torch.dtype:
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise FlasCheckpointError(
            f"flas checkpoint {name}: tensors must share one floating dtype, found {sorted(map(str, dtypes))}"
        )
    return dtypes.pop()


def save_checkpoint(
    out_dir: str | Path,
    flow: FlowFunction,
    *,
    fmt: str = "safetensors",
    name: str = "flas",
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint in the official layout (used by fixtures and conversions)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**flow.cfg.to_dict(), **(extra_config or {})}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    state = {k: v.detach().contiguous().cpu() for k, v in flow.state_dict().items()}
    if fmt == "safetensors":
        path = out / f"{name}.safetensors"
        save_file(state, str(path))
    elif fmt == "pt":
        path = out / f"{name}.pt"
        torch.save({"flow_fn": state, "step": 0, "val_loss": float("nan")}, str(path))
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'pt', got {fmt!r}")
    return path
