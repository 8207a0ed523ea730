"""The trained toy flow: official layout, deterministic build, and a steering effect the suite can measure.

Random flow weights change the text but toward nothing; these tests pin down
that the trained fixture flow moves generations toward its concepts, on the
transformers path and end to end through `flas-vllm eval` (engine, local
judge, report), and that the same measures show no effect on a random flow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from flas_vllm.fixtures import trained_flow as fixture_flow
from flas_vllm.fixtures.trained_flow import TRAINED_CONCEPTS, concept_word_share

# Concept-word share at T=2 minus unsteered (T=0), per concept, greedy, 32 tokens. Measured on the
# trained flow: 0.17 / 0.22 / 0.22 (transformers path, 4 prompts) and 0.20 / 0.25 / 0.20 (engine eval,
# 10 prompts) for ocean / cooking / music; on the random flow 0.00 / -0.02 / 0.00 on both.
# The local judge's mean concept score at T = 0, 1, 2 (engine eval): 0.0, 1.0, 1.5 trained; 0, 0, 0 random.
MIN_EFFECT = 0.1
EVAL_PROMPTS = 10
HF_PROMPTS = [
    "Give three tips for staying healthy.",
    "Describe the city of Paris in a few sentences.",
    "What is the capital of France?",
    "How do I learn to ride a bike?",
]


@pytest.fixture(scope="session")
def trained_ckpt(tiny_model):
    return fixture_flow.ensure_trained_flas_checkpoint(tiny_model)


# --------------------------------------------------------------------------- layout, build, cache


def test_official_layout_and_recipe_config(tiny_model, trained_ckpt):
    from transformers import AutoConfig

    from flas_vllm.core.checkpoint import load_checkpoint

    assert {p.name for p in trained_ckpt.iterdir() if not p.name.startswith(".")} == {"config.json",
                                                                                     "flas.safetensors"}
    ckpt = load_checkpoint(trained_ckpt, AutoConfig.from_pretrained(tiny_model))
    cfg = ckpt.config
    assert (cfg.layer, cfg.num_blocks, cfg.n_steps, cfg.T_min, cfg.T_max) == (
        fixture_flow.LAYER, 1, fixture_flow.N_STEPS, 0.5, 2.0)
    assert ckpt.dtype == torch.float32 and not ckpt.ignored
    assert cfg.extra["concepts"] == list(TRAINED_CONCEPTS)
    info = json.loads((trained_ckpt / fixture_flow._MARKER).read_text())
    assert info["final_loss"] < info["first_loss"] / 3  # it did learn


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "flas.safetensors")


def test_training_is_deterministic_with_a_seed(tiny_model, tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        fixture_flow.train_fixture_flow(tiny_model, tmp_path / name, seed=seed, steps=3)
    a, b, c = (_tensors(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the seed matters: the comparison is not vacuous
    assert (tmp_path / "a" / "config.json").read_bytes() == (tmp_path / "b" / "config.json").read_bytes()


def test_cache_builds_once_and_follows_the_base_fixture(tmp_path, monkeypatch):
    monkeypatch.setenv("FLAS_VLLM_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "base"
    base.mkdir()
    (base / ".flas_fixture.json").write_text(json.dumps({"key": "k1"}))
    calls = []

    def fake_train(model_dir, out_dir, *, seed, steps):
        calls.append(Path(out_dir))
        (Path(out_dir) / "flas.safetensors").write_bytes(b"x")
        return {"seed": seed}

    monkeypatch.setattr(fixture_flow, "train_fixture_flow", fake_train)
    p = fixture_flow.ensure_trained_flas_checkpoint(base)
    assert fixture_flow.ensure_trained_flas_checkpoint(base) == p and len(calls) == 1
    assert (p / "flas.safetensors").exists() and not list(p.parent.glob(".*.build-*"))
    (base / ".flas_fixture.json").write_text(json.dumps({"key": "k2"}))  # the base model was rebuilt
    assert fixture_flow.ensure_trained_flas_checkpoint(base) != p and len(calls) == 2


def test_mixed_concept_batch_equals_one_concept_at_a_time():
    """Training batches mix concepts; each row must see exactly what the one-concept path gives it."""
    from flas_vllm.core.config import FlasConfig, FlowGeometry
    from flas_vllm.fixtures.checkpoints import randomize_flow
    from flas_vllm.fixtures.tiny_gemma2 import TINY_GEMMA2_CONFIG
    from flas_vllm.core.flow import FlowFunction, SingleConceptKV

    g = FlowGeometry.from_base_config({**TINY_GEMMA2_CONFIG, "model_type": "gemma2"})
    flow = randomize_flow(FlowFunction(g, FlasConfig(num_blocks=2, layer=2)), seed=3)
    gen = torch.Generator().manual_seed(0)
    concepts = [torch.randn(5, g.hidden_size, generator=gen), torch.randn(9, g.hidden_size, generator=gen)]
    seq = 7
    q = torch.randn(2 * seq, g.num_heads, g.head_dim, generator=gen)
    mixed = fixture_flow._RowConceptKV(flow, concepts, seq)
    for block in range(2):
        out = mixed.attend(block, q)
        for row, c in enumerate(concepts):
            solo = SingleConceptKV(flow.project_concept(c), g.attn_logit_softcapping)
            rows = slice(row * seq, (row + 1) * seq)
            torch.testing.assert_close(out[rows], solo.attend(block, q[rows]), rtol=1e-5, atol=1e-6)


def test_concept_word_share():
    assert concept_word_share("The ocean waves, the ship!", TRAINED_CONCEPTS[0]) == pytest.approx(3 / 5)
    assert concept_word_share("", TRAINED_CONCEPTS[0]) == 0.0
    with pytest.raises(KeyError, match="not a trained fixture concept"):
        concept_word_share("x", "pirates")


# --------------------------------------------------------------------------- the effect


def _effects_hf(model_dir, ckpt) -> dict[str, float]:
    """Greedy, transformers path: per concept, concept-word share at T=2 minus unsteered."""
    from flas_vllm.reference.hf import HFSteerer

    steerer = HFSteerer.from_pretrained(model_dir, ckpt)
    out = {}
    for concept in TRAINED_CONCEPTS:
        gens = steerer.generate(HF_PROMPTS * 2, concept, [0.0] * len(HF_PROMPTS) + [2.0] * len(HF_PROMPTS),
                                max_new_tokens=32, ignore_eos=True)
        shares = [concept_word_share(g.text, concept) for g in gens]
        n = len(HF_PROMPTS)
        out[concept] = sum(shares[n:]) / n - sum(shares[:n]) / n
    return out


def test_trained_flow_steers_toward_each_concept_and_a_random_flow_does_not(tiny_model, trained_ckpt, make_ckpt,
                                                                           one_torch_thread):
    trained = _effects_hf(tiny_model, trained_ckpt)
    assert all(e >= MIN_EFFECT for e in trained.values()), trained
    random_flow = _effects_hf(tiny_model, make_ckpt(num_blocks=1))  # what `fixture-random` serves
    assert all(e < MIN_EFFECT for e in random_flow.values()), random_flow


def run_eval(out: Path, checkpoint: str = "fixture") -> tuple[list[dict], dict]:
    """The README quickstart on the trained concepts, greedy: (generation rows, report summary)."""
    cmd = [sys.executable, "-m", "flas_vllm.cli", "eval", "--out", str(out), "--model", "fixture",
           "--flas-checkpoint", checkpoint, "--concepts", "fixture", "--num-prompts", str(EVAL_PROMPTS),
           "--flowtimes", "0,1,2", "--temperature", "0", "--max-tokens", "32", "--dtype", "float32", "--eager",
           "--local-judge"]
    subprocess.run(cmd, check=True, timeout=900, cwd=out.parent)
    rows = pq.read_table(out / "generate" / "generations.parquet").to_pylist()
    return rows, json.loads((out / "report" / "summary.json").read_text())["summary"]


def effects_from_eval(rows: list[dict], summary: dict) -> tuple[dict[str, float], list[float]]:
    """Per concept: concept-word share at T=2 minus T=0; and the judge's mean concept score at T=0, 1, 2."""
    effects = {}
    for concept in TRAINED_CONCEPTS:
        share = {t: [concept_word_share(r["generation"], concept) for r in rows
                     if r["concept"] == concept and r["flowtime"] == t] for t in (0.0, 2.0)}
        effects[concept] = sum(share[2.0]) / len(share[2.0]) - sum(share[0.0]) / len(share[0.0])
    scores = [summary["by_flowtime"][repr(t)]["concept"] for t in (0.0, 1.0, 2.0)]
    return effects, scores


@pytest.mark.engine
def test_eval_measures_the_steering_effect_end_to_end(trained_ckpt, tmp_path):
    rows, summary = run_eval(tmp_path / "run")
    assert len(rows) == len(TRAINED_CONCEPTS) * EVAL_PROMPTS * 3 and summary["judge_failures"] == 0
    assert {r["checkpoint"] for r in rows} == {str(trained_ckpt)}
    effects, scores = effects_from_eval(rows, summary)
    assert all(e >= MIN_EFFECT for e in effects.values()), effects
    # the local judge's concept score (word overlap with the concept) rises with flowtime
    assert scores[0] < scores[1] < scores[2] and scores[2] - scores[0] >= 0.5, scores


def test_cli_fixture_aliases(monkeypatch, tmp_path):
    """`--flas-checkpoint fixture` is the trained flow, `fixture-random` the random one; `--concepts fixture`
    the trained concepts, read by the ordinary concept loader."""
    from flas_vllm.cli_common import resolve_fixture
    from flas_vllm.eval import commands
    from flas_vllm.eval.generate import load_concepts
    from flas_vllm.fixtures import checkpoints as fixture_checkpoints
    from flas_vllm.fixtures import tiny_gemma2 as fixtures

    monkeypatch.chdir(tmp_path)  # no directory called 'fixture' here
    monkeypatch.setattr(fixtures, "ensure_tiny_gemma2", lambda *a, **k: tmp_path / "tiny")
    monkeypatch.setattr(fixture_flow, "ensure_trained_flas_checkpoint", lambda model_dir: Path(model_dir) / "trained")
    monkeypatch.setattr(fixture_checkpoints, "ensure_flas_checkpoint",
                        lambda model_dir, **variant: Path(model_dir) / "random")
    assert resolve_fixture("fixture", "fixture") == (str(tmp_path / "tiny"), str(tmp_path / "tiny" / "trained"))
    assert resolve_fixture("fixture", "fixture-random")[1] == str(tmp_path / "tiny" / "random")
    concepts = load_concepts(commands._concepts_path(Path("fixture")))
    assert [c.concept for c in concepts] == list(TRAINED_CONCEPTS) and [c.concept_id for c in concepts] == [0, 1, 2]
    assert commands._concepts_path(None).name == commands.BUNDLED_CONCEPTS


@pytest.mark.engine
def test_demo_shows_concept_words_appear_with_flowtime(trained_ckpt, tmp_path):
    """`flas-vllm demo` (what scripts/run-demo.sh runs): per concept, the printed share rises from T=0."""
    import re

    out = subprocess.run([sys.executable, "-m", "flas_vllm.cli", "demo"], check=True, timeout=900, cwd=tmp_path,
                         capture_output=True, text=True).stdout
    assert f"checkpoint: {trained_ckpt}" in out
    shares = [[float(x) for x in m] for m in re.findall(r"concept-word share: T=0: ([\d.]+)\s+T=1: ([\d.]+)\s+"
                                                          r"T=2: ([\d.]+)", out)]
    assert len(shares) == len(TRAINED_CONCEPTS), out
    for t0, t1, t2 in shares:
        assert t1 > t0 and t2 > t0, shares
