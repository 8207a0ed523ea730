"""Checkpoint loading (docs/flas-spec.md section 1): every variant round-trips, every bad
checkpoint is refused with a FlasCheckpointError that names the culprit."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from flas_vllm.core.checkpoint import expected_tensor_shapes, load_checkpoint, resolve_checkpoint
from flas_vllm.core.config import FlasConfig, FlowGeometry
from flas_vllm.core.errors import FlasCheckpointError

LOGGER = "flas_vllm.core.checkpoint"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_config(tiny_model):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(tiny_model))


@pytest.fixture(scope="module")
def geometry(base_config):
    return FlowGeometry.from_base_config(base_config)


def weights_file(ckpt_dir: Path) -> Path:
    files = sorted(ckpt_dir.glob("*.safetensors")) + sorted(ckpt_dir.glob("*.pt"))
    assert len(files) == 1, files
    return files[0]


def read_saved(path: Path) -> dict[str, torch.Tensor]:
    """The tensors in a checkpoint file, read without the library."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return dict(torch.load(str(path), map_location="cpu", weights_only=True)["flow_fn"])


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".complete"))
    return dst


def edit_config(ckpt_dir: Path, **changes) -> None:
    p = ckpt_dir / "config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def rewrite_safetensors(path: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


# ---------------------------------------------------------------------------
# round trips


VARIANTS = [
    dict(),
    dict(num_blocks=2),
    dict(disable_self_attn=True),
    dict(dtype="bfloat16"),
    dict(fmt="pt"),
    dict(num_blocks=2, dtype="bfloat16", fmt="pt"),
    dict(num_blocks=2, disable_self_attn=True, dtype="bfloat16"),
    dict(disable_self_attn=True, fmt="pt"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_round_trip(make_ckpt, base_config, geometry, variant):
    ckpt_dir = make_ckpt(**variant)
    path = weights_file(ckpt_dir)
    saved = read_saved(path)
    want_dtype = getattr(torch, variant.get("dtype", "float32"))
    for spec in (ckpt_dir, str(ckpt_dir), path, str(path)):  # a directory or a file, Path or str
        ckpt = load_checkpoint(spec, base_config)
        assert ckpt.path == path
        assert ckpt.dtype == want_dtype
        assert ckpt.config.num_blocks == variant.get("num_blocks", 1)
        assert ckpt.config.disable_self_attn == variant.get("disable_self_attn", False)
        assert ckpt.config.layer == 2
        assert ckpt.ignored == []
    flow = ckpt.build_flow(geometry)
    assert flow.dtype == want_dtype
    sd = flow.state_dict()
    assert set(sd) == set(saved) == set(expected_tensor_shapes(geometry, ckpt.config))
    for name, t in saved.items():
        assert sd[name].dtype == want_dtype == t.dtype, name
        assert torch.equal(sd[name], t), name
    has_sa = not variant.get("disable_self_attn", False)
    assert any(".self_attn." in n for n in sd) == has_sa
    assert flow.uses_self_attention == has_sa
    assert len(flow.blocks) == variant.get("num_blocks", 1)


def test_fingerprint_is_a_content_hash(make_ckpt, base_config):
    a = load_checkpoint(make_ckpt(), base_config)
    b = load_checkpoint(make_ckpt(), base_config)
    c = load_checkpoint(make_ckpt(seed=1), base_config)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert len(a.fingerprint) == 16


def test_pt_with_embedded_config_and_concept_encoder(make_ckpt, base_config, tmp_path):
    src = make_ckpt(fmt="pt")
    blob = torch.load(str(weights_file(src)), map_location="cpu", weights_only=True)
    cfg = json.loads((src / "config.json").read_text())
    out = tmp_path / "train"
    out.mkdir()
    enc = {"embed_tokens.weight": torch.zeros(3, 4)}
    torch.save({"flow_fn": blob["flow_fn"], "concept_enc": enc, "step": 100, "config": cfg}, str(out / "best.pt"))
    ckpt = load_checkpoint(out, base_config)  # no config.json next to it: the embedded one is used
    assert ckpt.config.layer == 2 and ckpt.config.num_blocks == 1
    assert ckpt.concept_encoder is not None and set(ckpt.concept_encoder) == {"embed_tokens.weight"}


# ---------------------------------------------------------------------------
# Hub repo ids


def test_repo_id_shaped_local_directory_is_used_as_a_path(make_ckpt, base_config, tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("a local directory must not go to the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    local = copy_ckpt(make_ckpt(dtype="bfloat16"), tmp_path / "flas-ai" / "flas-gemma-2-2b-it")
    monkeypatch.chdir(tmp_path)
    ckpt = load_checkpoint("flas-ai/flas-gemma-2-2b-it", base_config)
    assert ckpt.path.resolve() == weights_file(local).resolve()
    assert ckpt.dtype == torch.bfloat16


def test_repo_id_goes_to_hub_via_snapshot_download(make_ckpt, base_config, tmp_path, monkeypatch):
    import huggingface_hub

    local = copy_ckpt(make_ckpt(), tmp_path / "snapshot")
    calls = []

    def fake_snapshot(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.chdir(tmp_path)
    ckpt = load_checkpoint("flas-ai/flas-gemma-2-2b-it", base_config)
    assert ckpt.path == weights_file(local)
    assert calls and calls[0][0] == "flas-ai/flas-gemma-2-2b-it"
    patterns = calls[0][1].get("allow_patterns") or []
    assert "config.json" in patterns and any("safetensors" in p for p in patterns)


def test_unknown_repo_id_offline_says_what_to_download(base_config, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)
    repo = "no-such-org/no-such-flas-checkpoint"
    with pytest.raises(FlasCheckpointError) as err:
        load_checkpoint(repo, base_config)
    msg = str(err.value)
    assert repo in msg
    assert "huggingface-cli download" in msg and "--local-dir" in msg  # what to download, where to put it
    assert "pass its path" in msg


def test_missing_local_path(base_config, tmp_path):
    with pytest.raises(FlasCheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope" / "flas.safetensors", base_config)
    with pytest.raises(FlasCheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"), base_config)


# ---------------------------------------------------------------------------
# bad checkpoints


def test_missing_tensor_is_named(make_ckpt, base_config, tmp_path):
    d = copy_ckpt(make_ckpt(), tmp_path / "c")
    rewrite_safetensors(weights_file(d), lambda t: t.pop("blocks.0.cross_attn.k_norm.weight"))
    with pytest.raises(FlasCheckpointError, match=r"missing tensor 'blocks\.0\.cross_attn\.k_norm\.weight'"):
        load_checkpoint(d, base_config)


def test_missing_tensor_of_second_block(make_ckpt, base_config, tmp_path):
    """A one-block file under a config saying num_blocks=2 (e.g. a wrong config.json)."""
    d = copy_ckpt(make_ckpt(), tmp_path / "c")
    edit_config(d, num_blocks=2)
    with pytest.raises(FlasCheckpointError, match=r"missing tensor 'blocks\.1\..*num_blocks=2"):
        load_checkpoint(d, base_config)


def test_shape_mismatch_names_tensor_and_shapes(make_ckpt, base_config, tmp_path):
    d = copy_ckpt(make_ckpt(), tmp_path / "c")

    def shrink(t):
        t["blocks.0.mlp_gate"] = torch.zeros(7)

    rewrite_safetensors(weights_file(d), shrink)
    with pytest.raises(FlasCheckpointError) as err:
        load_checkpoint(d, base_config)
    msg = str(err.value)
    assert "'blocks.0.mlp_gate'" in msg and "[7]" in msg and "[128]" in msg


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "gemma", "qwen3_moe"])
def test_unknown_base_model_type(make_ckpt, base_config, model_type):
    """Families outside the registry are refused by name, with the supported list (llama is supported now)."""
    base = base_config.to_dict()
    base["model_type"] = model_type
    with pytest.raises(FlasCheckpointError, match=f"model_type '{model_type}' is not supported.*gemma2.*llama.*qwen3"):
        load_checkpoint(make_ckpt(), base)


def test_layer_out_of_range(make_ckpt, base_config, tmp_path):
    d = copy_ckpt(make_ckpt(), tmp_path / "c")
    edit_config(d, layer=99)
    with pytest.raises(FlasCheckpointError) as err:
        load_checkpoint(d, base_config)
    msg = str(err.value)
    assert "'layer'" in msg and "99" in msg and "0..3" in msg


def test_non_json_config(make_ckpt, base_config, tmp_path):
    d = copy_ckpt(make_ckpt(), tmp_path / "c")
    (d / "config.json").write_text("{layer: 2,")
    with pytest.raises(FlasCheckpointError, match=r"config\.json is not valid JSON"):
        load_checkpoint(d, base_config)


def test_config_with_wrong_type_names_key(make_ckpt, base_config, tmp_path):
    d = copy_ckpt(make_ckpt(), tmp_path / "c")
    edit_config(d, num_blocks="two")
    with pytest.raises(FlasCheckpointError, match="'num_blocks' must be an integer"):
        load_checkpoint(d, base_config)


def _deep_base(base_config, layers=26):
    """The tiny base config with enough layers for the original's default layer (20)."""
    raw = base_config.to_dict()
    raw["num_hidden_layers"] = layers
    raw.pop("layer_types", None)
    return raw


def test_missing_config_json_uses_the_originals_defaults_and_names_them(make_ckpt, base_config, tmp_path, caplog):
    d = copy_ckpt(make_ckpt(num_blocks=2, disable_self_attn=True), tmp_path / "c")
    (d / "config.json").unlink()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ckpt = load_checkpoint(d, _deep_base(base_config))
    cfg = ckpt.config
    assert (cfg.model_id, cfg.layer, cfg.n_steps, cfg.prompt_format) == ("google/gemma-2-2b-it", 20, 2, "chat")
    assert cfg.num_blocks == 2 and cfg.disable_self_attn  # read from the tensors
    text = caplog.text
    assert "config.json not found" in text
    for key in ("model_id", "layer", "n_steps", "prompt_format", "disable_mlp", "disable_cross_attn"):
        assert f"{key}=" in text, key
    assert read_saved(weights_file(make_ckpt(num_blocks=2, disable_self_attn=True))).keys() == ckpt.tensors.keys()
    # with the default layer 20 the 4-layer tiny model is refused, naming the layer
    with pytest.raises(FlasCheckpointError, match=r"'layer' = 20 is out of range"):
        load_checkpoint(d, base_config)


def test_config_json_with_some_keys_warns_about_each_defaulted_key(make_ckpt, base_config, tmp_path, caplog):
    d = copy_ckpt(make_ckpt(), tmp_path / "c")
    (d / "config.json").write_text(json.dumps({"layer": 2, "num_blocks": 1, "n_steps": 3, "model_id": "x",
                                                "concept_max_len": 64, "disable_self_attn": False,
                                                "disable_cross_attn": False, "disable_mlp": False,
                                                "T_min": 0.5, "T_max": 2.0}))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        load_checkpoint(d, base_config)
    assert "prompt_format not set" in caplog.text and "prompt_format='chat'" in caplog.text


def test_pt_holding_a_bare_state_dict(make_ckpt, base_config):
    d = make_ckpt(fmt="pt", bare_state_dict=True)
    raw = torch.load(str(weights_file(d)), map_location="cpu", weights_only=True)
    assert "flow_fn" not in raw and all(isinstance(v, torch.Tensor) for v in raw.values())
    ckpt = load_checkpoint(d, base_config)
    assert ckpt.tensors.keys() == raw.keys()
    for name, t in raw.items():
        assert torch.equal(ckpt.tensors[name], t), name
    same = load_checkpoint(make_ckpt(fmt="pt"), base_config)  # the same flow saved with 'flow_fn'
    assert all(torch.equal(same.tensors[n], t) for n, t in ckpt.tensors.items())


def test_pt_without_flow_fn_or_tensors(make_ckpt, base_config, tmp_path):
    d = copy_ckpt(make_ckpt(fmt="pt"), tmp_path / "c")
    w = weights_file(d)
    blob = torch.load(str(w), map_location="cpu", weights_only=True)
    torch.save({"model": blob["flow_fn"], "step": 3}, str(w))
    with pytest.raises(FlasCheckpointError, match="neither a 'flow_fn' state dict nor a bare state dict"):
        load_checkpoint(d, base_config)


@pytest.mark.parametrize("flag", ["disable_cross_attn", "disable_mlp"])
def test_disabled_branches_still_carry_their_tensors(make_ckpt, base_config, geometry, flag, caplog):
    """As the original: those modules are built and saved, only the forward pass skips them."""
    d = make_ckpt(num_blocks=2, **{flag: True})
    saved = read_saved(weights_file(d))
    prefix = "blocks.1.cross_attn." if flag == "disable_cross_attn" else "blocks.1.down_proj"
    assert any(n.startswith(prefix) for n in saved)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ckpt = load_checkpoint(d, base_config)
    assert "ignoring" not in caplog.text
    assert getattr(ckpt.config, flag)
    assert set(ckpt.tensors) == set(expected_tensor_shapes(geometry, ckpt.config))


def test_directory_without_weights(make_ckpt, base_config, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(make_ckpt() / "config.json", d / "config.json")
    with pytest.raises(FlasCheckpointError, match=r"no \.safetensors or \.pt file in directory"):
        load_checkpoint(d, base_config)


def test_directory_with_several_weight_files(make_ckpt, base_config, tmp_path):
    d = copy_ckpt(make_ckpt(), tmp_path / "c")
    shutil.copy(weights_file(d), d / "other.safetensors")
    with pytest.raises(FlasCheckpointError, match="several weight files"):
        load_checkpoint(d, base_config)
    # passing one of them explicitly works
    assert load_checkpoint(d / "other.safetensors", base_config).path.name == "other.safetensors"


def test_wrong_suffix_and_corrupt_file(make_ckpt, base_config, tmp_path):
    d = copy_ckpt(make_ckpt(), tmp_path / "c")
    bin_path = d / "flas.bin"
    bin_path.write_bytes(b"x")
    with pytest.raises(FlasCheckpointError, match="neither a .safetensors nor a .pt"):
        resolve_checkpoint(bin_path)
    weights_file(d).write_bytes(b"not a safetensors file")
    with pytest.raises(FlasCheckpointError, match="cannot read"):
        load_checkpoint(d, base_config)


def test_mixed_dtypes_refused(make_ckpt, base_config, tmp_path):
    d = copy_ckpt(make_ckpt(), tmp_path / "c")

    def half(t):
        t["blocks.0.mlp_gate"] = t["blocks.0.mlp_gate"].to(torch.bfloat16)

    rewrite_safetensors(weights_file(d), half)
    with pytest.raises(FlasCheckpointError, match="one floating dtype"):
        load_checkpoint(d, base_config)


def test_legacy_extra_tensors_ignored_with_warning(make_ckpt, base_config, geometry, caplog):
    d = make_ckpt(legacy_extra_tensors=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ckpt = load_checkpoint(d, base_config)
    assert ckpt.ignored == ["blocks.0.legacy_unused.weight"]
    assert any("blocks.0.legacy_unused.weight" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    flow = ckpt.build_flow(geometry)
    assert "blocks.0.legacy_unused.weight" not in flow.state_dict()


def test_disable_self_attn_checkpoint_with_old_self_attn_tensors(make_ckpt, base_config, geometry, tmp_path, caplog):
    d = copy_ckpt(make_ckpt(), tmp_path / "old")  # carries self-attention tensors
    edit_config(d, disable_self_attn=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ckpt = load_checkpoint(d, base_config)
    sa = {"blocks.0.pre_sa_norm.weight", "blocks.0.post_sa_norm.weight", "blocks.0.self_attn_gate",
          "blocks.0.self_attn.q_proj.weight", "blocks.0.self_attn.k_proj.weight",
          "blocks.0.self_attn.v_proj.weight", "blocks.0.self_attn.o_proj.weight"}
    assert set(ckpt.ignored) == sa
    assert any(r.levelno == logging.WARNING and "ignoring 7 tensor" in r.getMessage() for r in caplog.records)
    flow = ckpt.build_flow(geometry)
    assert not flow.uses_self_attention
    saved = read_saved(weights_file(d))
    for name, t in flow.state_dict().items():
        assert torch.equal(t, saved[name])


# ---------------------------------------------------------------------------
# config defaults


def test_config_defaults_when_keys_missing():
    cfg = FlasConfig.from_dict({})
    assert cfg.layer == 20
    assert cfg.num_blocks == 2
    assert cfg.n_steps == 2
    assert cfg.prompt_format == "chat"
    assert cfg.model_id == "google/gemma-2-2b-it"
    assert cfg.concept_max_len == 64
    assert (cfg.disable_cross_attn, cfg.disable_self_attn, cfg.disable_mlp) == (False, False, False)
    assert (cfg.T_min, cfg.T_max) == (0.5, 2.0)


def test_config_keeps_unknown_keys_and_checks_values():
    cfg = FlasConfig.from_dict({"layer": 3, "lr": 1e-4, "prompt_format": "alpaca"})
    assert cfg.layer == 3 and cfg.prompt_format == "alpaca" and cfg.extra == {"lr": 1e-4}
    assert cfg.to_dict()["lr"] == 1e-4
    with pytest.raises(FlasCheckpointError, match="'prompt_format'"):
        FlasConfig.from_dict({"prompt_format": "raw"})
    with pytest.raises(FlasCheckpointError, match="'num_blocks' must be >= 1"):
        FlasConfig.from_dict({"num_blocks": 0})
    with pytest.raises(FlasCheckpointError, match="'disable_mlp' must be a boolean"):
        FlasConfig.from_dict({"disable_mlp": "yes"})


def test_config_json_with_only_some_keys_uses_defaults(make_ckpt, base_config, tmp_path):
    d = copy_ckpt(make_ckpt(num_blocks=2), tmp_path / "c")
    (d / "config.json").write_text(json.dumps({"layer": 2}))  # num_blocks defaults to 2
    ckpt = load_checkpoint(d, base_config)
    assert ckpt.config.num_blocks == 2 and ckpt.config.n_steps == 2 and ckpt.config.prompt_format == "chat"
