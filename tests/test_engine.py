"""End-to-end checks of FLAS steering on real vLLM engines (slow: `-m engine`).

Engines (never more than two alive at once):

- MAIN: fp32, num_blocks=2 checkpoint, vLLM's DEFAULT compilation (not eager),
  max_concepts=4. Alive for the whole module; its solo results are the reference
  for the other engines of the same compile mode.
- VANILLA: plain `vllm.LLM` on the same Gemma-2 (same dtype/compile mode), for
  the "unsteered and T=0 are bit-identical to plain Gemma-2" check.
- STRESS: like MAIN but with a 32-token step budget (chunked prefill) and a tiny
  KV pool (forced preemption).
- SLOTS: max_concepts=2 (eager), for concept-slot eviction under load.

Every prompt is fed as token ids from `format_prompt`, so vLLM and the
transformers reference see the same ids. Exactness is asserted in fp32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pytest

from flas_vllm.engine.llm import shutdown_engine
from tests.texts import LONG, LONG_CONCEPT, MID, SHORT as SHORT_A

pytestmark = pytest.mark.engine

KV_BYTES = 256 * 1024 * 1024  # vLLM's CPU backend only sees NUMA node 0: never size the cache by utilization
MAX_TOKENS = 24
MAX_CONCEPTS = 4
MAX_N_STEPS = 4  # MAIN's limit for flas_n_steps; its checkpoint's default is 3
TIMINGS: dict[str, float] = {}

# ---------------------------------------------------------------------------
# prompts and concepts

SHORT_B = "Write a short story about a robot."
# > 128 prompt tokens, so that at least one full 128-token KV block is cacheable (CPU default block size).
PREFIX_LONG = LONG + (
    " Then compare the plan with a program for adults, describe what the volunteers should do each week, "
    "and explain how the library could measure whether the program was a success at the end of the summer, "
    "using simple numbers that the town council would understand."
)

LOVE = "love"
OCEAN = "the ocean and sailing ships"


@dataclass(frozen=True)
class Req:
    name: str
    text: str
    concept: str | None = None
    flowtime: float | None = None
    salt: str | None = None
    n_steps: int | None = None

    @property
    def steered(self) -> bool:
        return self.concept is not None and bool(self.flowtime)

    def extra_args(self):
        from flas_vllm.core.steering import steering

        if self.concept is None:
            return None
        return steering(self.concept, self.flowtime, n_steps=self.n_steps)


@dataclass
class Result:
    token_ids: tuple[int, ...]
    logprobs: tuple[tuple[tuple[int, float], ...], ...]  # per step: sorted (token, logprob) pairs returned
    cumulative_logprob: float
    num_cached_tokens: int | None
    chosen_logprobs: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, out) -> "Result":
        c = out.outputs[0]
        steps = tuple(tuple(sorted((int(t), float(lp.logprob)) for t, lp in d.items())) for d in c.logprobs)
        chosen = [float(d[t].logprob) for t, d in zip(c.token_ids, c.logprobs)]
        return cls(tuple(c.token_ids), steps, float(c.cumulative_logprob), out.num_cached_tokens, chosen)


MIXED = [
    Req("unsteered-short", SHORT_A),
    Req("T0-ocean", SHORT_B, OCEAN, 0.0),
    Req("love-1.0", MID, LOVE, 1.0),
    Req("love-2.5", SHORT_A, LOVE, 2.5),
    Req("ocean-0.5", LONG, OCEAN, 0.5),
    Req("ocean-1.5", SHORT_B, OCEAN, 1.5),
    Req("longconcept-4.0", MID, LONG_CONCEPT, 4.0),
    Req("longconcept-1.0", LONG, LONG_CONCEPT, 1.0),
    Req("love-8.0", LONG, LOVE, 8.0),
    Req("unsteered-long", LONG),
    Req("T0-love", MID, LOVE, 0),
]


# ---------------------------------------------------------------------------
# helpers


_TOKENIZERS: dict[str, object] = {}


def prompt_ids(model_dir, text: str) -> list[int]:
    from transformers import AutoTokenizer

    from flas_vllm.core.prompts import format_prompt

    key = str(model_dir)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(key)
    return format_prompt(_TOKENIZERS[key], text)


def sampling(req: Req | None = None, *, max_tokens: int = MAX_TOKENS, logprobs: int = 1, extra=None):
    from vllm import SamplingParams

    if req is not None:
        extra = req.extra_args()
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs,
                          extra_args=extra)


def prompt_of(model_dir, req: Req) -> dict:
    p = {"prompt_token_ids": prompt_ids(model_dir, req.text)}
    if req.salt is not None:
        p["cache_salt"] = req.salt
    return p


def run(llm, model_dir, reqs, *, unsteered: bool = False, **kw) -> list[Result]:
    prompts = [prompt_of(model_dir, r) for r in reqs]
    params = [sampling(None if unsteered else r, **kw) for r in reqs]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.request_id for o in outs] == sorted((o.request_id for o in outs), key=int)
    return [Result.of(o) for o in outs]


def assert_same(got: Result, want: Result, what: str) -> None:
    """Bit-identical tokens and logprobs, with a readable first difference."""
    if got.token_ids != want.token_ids:
        i = next(i for i, (a, b) in enumerate(zip(got.token_ids, want.token_ids)) if a != b)
        pytest.fail(f"{what}: tokens differ from step {i}: {got.token_ids[i:i + 6]} vs {want.token_ids[i:i + 6]}")
    for i, (a, b) in enumerate(zip(got.logprobs, want.logprobs)):
        assert a == b, f"{what}: logprobs differ at step {i}: {a} vs {b}"
    assert got.cumulative_logprob == want.cumulative_logprob, what


def start_flas(model_dir, ckpt, label: str, **kw):
    from flas_vllm.engine.llm import FlasLLM

    kw.setdefault("dtype", "float32")
    kw.setdefault("kv_cache_memory_bytes", KV_BYTES)
    kw.setdefault("seed", 0)
    t0 = time.perf_counter()
    llm = FlasLLM(str(model_dir), str(ckpt), **kw)
    TIMINGS[f"{label} start"] = time.perf_counter() - t0
    return llm


@pytest.fixture(scope="module", autouse=True)
def _report_timings():
    yield
    if TIMINGS:
        print("\nengine timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in TIMINGS.items()))


# ---------------------------------------------------------------------------
# MAIN engine and its reference results


@pytest.fixture(scope="module")
def ckpt2(make_ckpt):
    return make_ckpt(num_blocks=2)


@pytest.fixture(scope="module")
def main_llm(tiny_model, ckpt2):
    t0 = time.perf_counter()
    llm = start_flas(tiny_model, ckpt2, "main (compiled)", max_concepts=MAX_CONCEPTS, max_n_steps=MAX_N_STEPS)
    yield llm
    TIMINGS["main total"] = time.perf_counter() - t0
    shutdown_engine(llm)


@pytest.fixture(scope="module")
def solo(main_llm, tiny_model) -> dict[str, Result]:
    """Each MIXED request run alone on the MAIN engine."""
    return {r.name: run(main_llm, tiny_model, [r])[0] for r in MIXED}


MIXED_STATS: dict[str, dict] = {}  # MAIN's concept stats around the `mixed` run


@pytest.fixture(scope="module")
def mixed(main_llm, tiny_model) -> list[Result]:
    MIXED_STATS["before"] = main_llm.concept_stats()
    logged = len(main_llm.llm.collective_rpc("flas_flow_log")[0])
    results = run(main_llm, tiny_model, MIXED)
    MIXED_STATS["after"] = main_llm.concept_stats()
    MIXED_STATS["steps"] = main_llm.llm.collective_rpc("flas_flow_log")[0][logged:]  # (tokens, steered, rows)
    return results


def test_mixed_batch_equals_solo_in_two_orders(main_llm, tiny_model, solo, mixed):
    assert len(MIXED) >= 8
    for req, res in zip(MIXED, mixed):
        assert len(res.token_ids) == MAX_TOKENS
        assert_same(res, solo[req.name], f"{req.name} (batch order 1)")
    reordered = MIXED[1::2][::-1] + MIXED[0::2]
    for req, res in zip(reordered, run(main_llm, tiny_model, reordered)):
        assert_same(res, solo[req.name], f"{req.name} (batch order 2)")


def test_mixed_batch_runs_the_flow_on_its_steered_tokens_only(main_llm, tiny_model, mixed):
    """MAIN runs the skip path: each step's flow computes its steered tokens, rounded up to a bucket
    (step_state.flow_row_bucket: padding under FLOW_ROW_BUCKET rows a step), not every scheduled token."""
    from flas_vllm.engine.step_state import FLOW_ROW_BUCKET

    delta = {k: MIXED_STATS["after"][k] - MIXED_STATS["before"][k]
             for k in ("flow_rows", "steered_tokens", "flow_steps", "flow_attention_tokens")}
    scheduled = {r.name: len(prompt_ids(tiny_model, r.text)) - (res.num_cached_tokens or 0) + MAX_TOKENS - 1
                 for r, res in zip(MIXED, mixed)}  # prompt tokens not cached, then one token per decode step
    assert delta["steered_tokens"] == sum(n for r in MIXED if r.steered for n in [scheduled[r.name]])
    assert delta["flow_steps"] >= MAX_TOKENS
    assert delta["steered_tokens"] <= delta["flow_rows"] < delta["steered_tokens"] + FLOW_ROW_BUCKET * delta["flow_steps"]
    assert delta["flow_rows"] < sum(scheduled.values())  # unsteered tokens cost no flow rows
    # nor flow attention: vLLM's CPU attention metadata narrowed to the steered requests (steered_attention.py),
    # except in steps whose bucket reached every token (the flow runs on all of them, unnarrowed)
    steps = MIXED_STATS["steps"]
    assert len(steps) == delta["flow_steps"] and any(rows < tokens for tokens, _, rows in steps)
    assert delta["flow_attention_tokens"] == sum(tokens if rows == tokens else steered for tokens, steered, rows in steps)
    # the time embeddings come from the engine's table (time_table.py): rows filled as step sizes came in (at most
    # one per steered request), every row released when its requests finished
    filled = MIXED_STATS["after"]["time_rows_filled"] - MIXED_STATS["before"]["time_rows_filled"]
    assert 1 <= filled <= sum(r.steered for r in MIXED)
    assert MIXED_STATS["after"]["time_rows_in_use"] == 0


def test_steering_changes_output(solo):
    """Sanity: a steered request is not plain Gemma-2 on the same prompt (else parity proves little)."""
    plain = {SHORT_A: solo["unsteered-short"], LONG: solo["unsteered-long"]}
    checked = 0
    for req in MIXED:
        if req.steered and req.text in plain:
            assert solo[req.name].token_ids != plain[req.text].token_ids, req.name
            checked += 1
    assert checked >= 3


# ---------------------------------------------------------------------------
# parity with the transformers path


_HF: dict = {}


def hf_steerer(model_dir, ckpt, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flas_vllm.reference.hf import HFSteerer

    key = (str(model_dir), dtype)
    if key not in _HF:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype),
                                                     attn_implementation="eager")
        _HF[key] = (model, AutoTokenizer.from_pretrained(str(model_dir)))
    model, tok = _HF[key]
    return HFSteerer(model, tok, str(ckpt))


def hf_reference(steerer, model_dir, reqs, max_new_tokens: int = MAX_TOKENS):
    """HF generations (use_cache=True) for steered/T=0/unsteered reqs, one HF batch per concept."""
    out = {}
    groups: dict = {}
    for r in reqs:
        groups.setdefault(r.concept, []).append(r)
    for concept, rs in groups.items():
        gens = steerer.generate([prompt_ids(model_dir, r.text) for r in rs], concept,
                                [float(r.flowtime or 0.0) for r in rs], max_new_tokens=max_new_tokens,
                                use_cache=True, ignore_eos=True)
        out.update({r.name: g for r, g in zip(rs, gens)})
    return out


def assert_matches_hf(got: Result, ref, what: str, tol: float = 1e-3, min_tokens: int = 24) -> None:
    assert len(got.token_ids) >= min_tokens
    if list(got.token_ids) != list(ref.token_ids):
        i = next(i for i, (a, b) in enumerate(zip(got.token_ids, ref.token_ids)) if a != b)
        pytest.fail(f"{what}: vLLM and HF differ from step {i}: {got.token_ids[i:i + 6]} vs "
                    f"{ref.token_ids[i:i + 6]} (HF top-2 margin there {ref.top2_margins[i]:.4f})")
    assert math.isclose(got.cumulative_logprob, sum(ref.logprobs), abs_tol=tol), (
        f"{what}: cumulative logprob {got.cumulative_logprob} vs HF {sum(ref.logprobs)}")


def test_steered_matches_transformers(tiny_model, ckpt2, solo):
    """num_blocks=2 checkpoint, prompts past the 32-token sliding window, a concept over 64 tokens."""
    assert len(prompt_ids(tiny_model, LONG)) > 100 and len(prompt_ids(tiny_model, MID)) > 40
    ref = hf_reference(hf_steerer(tiny_model, ckpt2), tiny_model, MIXED)
    for req in MIXED:
        assert_matches_hf(solo[req.name], ref[req.name], req.name)


# ---------------------------------------------------------------------------
# per-request n_steps and the stop rule


N_STEPS_MIX = [
    Req("ocean-1.5-N1", SHORT_B, OCEAN, 1.5, n_steps=1),
    Req("ocean-1.5-N2", SHORT_B, OCEAN, 1.5, n_steps=2),
    Req("love-2.5-N4", SHORT_A, LOVE, 2.5, n_steps=MAX_N_STEPS),
    Req("love-2.5-default", SHORT_A, LOVE, 2.5),
    Req("long-1.0-N2", LONG, LONG_CONCEPT, 1.0, n_steps=2),
    Req("unsteered-mid", MID),
]


def test_mixed_n_steps_batch_equals_solo_and_transformers(main_llm, tiny_model, ckpt2):
    """Each request integrates with its own dt = T/N for its own N steps, in one batch."""
    solo_n = {r.name: run(main_llm, tiny_model, [r])[0] for r in N_STEPS_MIX}
    for req, res in zip(N_STEPS_MIX, run(main_llm, tiny_model, N_STEPS_MIX)):
        assert_same(res, solo_n[req.name], f"{req.name} in a mixed-n_steps batch")
    assert solo_n["ocean-1.5-N1"].token_ids != solo_n["ocean-1.5-N2"].token_ids
    assert solo_n["love-2.5-N4"].token_ids != solo_n["love-2.5-default"].token_ids
    steerer = hf_steerer(tiny_model, ckpt2)
    assert steerer.n_steps == 3
    for req in N_STEPS_MIX:
        if req.concept is None:
            continue
        ref = steerer.generate([prompt_ids(tiny_model, req.text)], req.concept, req.flowtime,
                               max_new_tokens=MAX_TOKENS, ignore_eos=True, n_steps=req.n_steps)[0]
        assert_matches_hf(solo_n[req.name], ref, req.name)


def test_original_stop_rule_keeps_generating_past_end_of_turn(main_llm, tiny_model):
    """`flas_stop_rule: original` stops at <eos> only; vLLM's rule also stops at <end_of_turn>.

    Where a free-running reply ends depends on the processor's rounding (issue 19, item 6), so the
    token each rule must react to is forced with a logit bias far above any logit of the fixture
    (its final softcap bounds them): every generated token is that token, on any processor.
    """
    from vllm import SamplingParams

    from flas_vllm.fixtures.tokenizer import EOS_ID, EOT_ID

    prompt = {"prompt_token_ids": prompt_ids(tiny_model, SHORT_A)}
    n = 6

    def reply(rule, steer, forced):
        extra = {**(steer or {}), "flas_stop_rule": rule}
        params = SamplingParams(temperature=0.0, max_tokens=n, logit_bias={forced: 100.0}, extra_args=extra)
        out = main_llm.generate([prompt], [params], use_tqdm=False)[0].outputs[0]
        return out.finish_reason, list(out.token_ids)

    for steer in (None, steering_args(LOVE, 1.0)):
        # vLLM's rule ends the turn at <end_of_turn>; the original's writes on past it, to max_tokens
        assert reply("vllm", steer, EOT_ID) == ("stop", [EOT_ID])
        assert reply("original", steer, EOT_ID) == ("length", [EOT_ID] * n)
        # both stop at <eos>
        assert reply("vllm", steer, EOS_ID) == ("stop", [EOS_ID])
        assert reply("original", steer, EOS_ID) == ("stop", [EOS_ID])
    with pytest.raises(ValueError, match="flas_stop_rule"):
        main_llm.generate([prompt], [SamplingParams(max_tokens=4, ignore_eos=True,
                                                    extra_args={"flas_stop_rule": "original"})], use_tqdm=False)


def steering_args(concept, flowtime):
    from flas_vllm.core.steering import steering

    return steering(concept, flowtime)


# ---------------------------------------------------------------------------
# prefix cache


def test_prefix_cache_respects_steering(main_llm, tiny_model):
    n_prompt = len(prompt_ids(tiny_model, PREFIX_LONG))
    assert n_prompt > 128 + 8, n_prompt
    plain = Req("plain", PREFIX_LONG)
    a = Req("love-1.5", PREFIX_LONG, LOVE, 1.5)
    a_other_t = Req("love-2.0", PREFIX_LONG, LOVE, 2.0)
    b = Req("ocean-1.5", PREFIX_LONG, OCEAN, 1.5)
    a_salt = Req("love-1.5-tenantA", PREFIX_LONG, LOVE, 1.5, salt="tenant-A")
    a_salt_b = Req("love-1.5-tenantB", PREFIX_LONG, LOVE, 1.5, salt="tenant-B")
    plain_salt = Req("plain-tenantA", PREFIX_LONG, salt="tenant-A")

    def one(req):
        return run(main_llm, tiny_model, [req])[0]

    # cold results: an empty prefix cache before each
    cold = {}
    for req in (plain, a, a_other_t, b):
        assert main_llm.reset_prefix_cache()
        cold[req.name] = one(req)
        assert cold[req.name].num_cached_tokens == 0, req.name
    assert cold["plain"].token_ids != cold["love-1.5"].token_ids

    assert main_llm.reset_prefix_cache()
    warm_plain = one(plain)
    assert_same(warm_plain, cold["plain"], "plain, cold cache")
    assert one(plain).num_cached_tokens > 0, "identical unsteered prompt must reuse cached blocks"

    # (request, reuses cached blocks?, reference, why), in this order against one warm cache
    sequence = [
        (a, False, "love-1.5", "first run with new steering must not reuse the unsteered KV"),
        (a, True, "love-1.5", "identical steering should reuse cached blocks"),
        (a_other_t, False, "love-2.0", "same concept, other flowtime: no reuse"),
        (b, False, "ocean-1.5", "second concept after the first: no reuse"),
        (b, True, "ocean-1.5", "second concept, warm"),
        # a user cache_salt still applies, on top of the steering salt
        (a_salt, False, "love-1.5", "tenant-A must not see the unsalted steered KV"),
        (a_salt, True, "love-1.5", "same tenant, same steering should share"),
        (a_salt_b, False, "love-1.5", "tenant-B must not see tenant-A's KV"),
        (plain_salt, False, "plain", "tenant-A unsteered must not see tenant-A steered KV nor unsalted KV"),
    ]
    for req, reuses, reference, why in sequence:
        res = one(req)
        assert (res.num_cached_tokens > 0) == reuses, f"{req.name}: {why} (cached {res.num_cached_tokens})"
        assert_same(res, cold[reference], f"{req.name}: {why}")

    # a batch: identical steering shares, the unsteered twin does not disturb it
    outs = run(main_llm, tiny_model, [a, plain, b, a_other_t])
    for req, res in zip([a, plain, b, a_other_t], outs):
        assert_same(res, cold[req.name], f"{req.name} in a warm batch")


# ---------------------------------------------------------------------------
# steering validation


BAD_FIELDS = [
    ("flowtime NaN", {"flas_concept": LOVE, "flas_flowtime": float("nan")}, "flas_flowtime"),
    ("flowtime inf", {"flas_concept": LOVE, "flas_flowtime": float("inf")}, "flas_flowtime"),
    ("flowtime -inf", {"flas_concept": LOVE, "flas_flowtime": float("-inf")}, "flas_flowtime"),
    ("flowtime negative", {"flas_concept": LOVE, "flas_flowtime": -0.5}, "flas_flowtime"),
    ("flowtime above max_flowtime", {"flas_concept": LOVE, "flas_flowtime": 8.01}, "flas_flowtime"),
    ("flowtime string", {"flas_concept": LOVE, "flas_flowtime": "1.0"}, "flas_flowtime"),
    ("flowtime bool", {"flas_concept": LOVE, "flas_flowtime": True}, "flas_flowtime"),
    ("flowtime None", {"flas_concept": LOVE, "flas_flowtime": None}, "flas_flowtime"),
    ("concept empty", {"flas_concept": "", "flas_flowtime": 1.0}, "flas_concept"),
    ("concept whitespace", {"flas_concept": " \n\t ", "flas_flowtime": 1.0}, "flas_concept"),
    ("concept int", {"flas_concept": 7, "flas_flowtime": 1.0}, "flas_concept"),
    ("concept list", {"flas_concept": ["love"], "flas_flowtime": 1.0}, "flas_concept"),
    ("concept over 2048 bytes", {"flas_concept": "é" * 1025, "flas_flowtime": 1.0}, "flas_concept"),
    ("unknown flas_ key", {"flas_concept": LOVE, "flas_flowtime": 1.0, "flas_strength": 2}, "flas_strength"),
    ("concept without flowtime", {"flas_concept": LOVE}, "flas_flowtime"),
    ("flowtime without concept", {"flas_flowtime": 1.0}, "flas_concept"),
    ("n_steps 0", {"flas_concept": LOVE, "flas_flowtime": 1.0, "flas_n_steps": 0}, "flas_n_steps"),
    ("n_steps above max_n_steps", {"flas_concept": LOVE, "flas_flowtime": 1.0, "flas_n_steps": 5}, "flas_n_steps"),
    ("n_steps float", {"flas_concept": LOVE, "flas_flowtime": 1.0, "flas_n_steps": 2.0}, "flas_n_steps"),
    ("stop rule unknown", {"flas_stop_rule": "eot"}, "flas_stop_rule"),
]


def test_invalid_steering_is_rejected_before_the_engine(main_llm, tiny_model):
    ids = {"prompt_token_ids": prompt_ids(tiny_model, SHORT_A)}
    good = Req("good", SHORT_A, LOVE, 1.0)
    expected = run(main_llm, tiny_model, [good])[0]
    before = main_llm.concept_stats()
    for what, extra, fld in BAD_FIELDS:
        with pytest.raises(ValueError) as info:
            main_llm.generate([ids], [sampling(extra=extra)], use_tqdm=False)
        assert fld in str(info.value), f"{what}: the error does not name {fld}: {info.value}"
        assert main_llm.llm_engine.get_num_unfinished_requests() == 0, what
    after = main_llm.concept_stats()
    assert after["steered_requests"] == before["steered_requests"], "a rejected request reached the worker"
    assert after["misses"] == before["misses"] and after["encoded"] == before["encoded"]
    # a bad request after a good one: the call fails and the good one, already sent, is aborted
    with pytest.raises(ValueError, match="flas_flowtime"):
        main_llm.generate([ids, ids], [sampling(good), sampling(extra=BAD_FIELDS[0][1])], use_tqdm=False)
    assert main_llm.llm_engine.get_num_unfinished_requests() == 0
    # the engine is fine: the next valid request still succeeds, with the same result
    assert_same(run(main_llm, tiny_model, [good])[0], expected, "valid request after rejections")
    # exactly max_flowtime and exactly 2048 bytes are accepted
    edge = [Req("tmax", SHORT_A, LOVE, 8.0), Req("2048B", SHORT_A, "é" * 1024, 1.0)]
    assert all(len(r.token_ids) == MAX_TOKENS for r in run(main_llm, tiny_model, edge))


# ---------------------------------------------------------------------------
# concept preload / evict


def test_preload_counts_a_hit_and_evict_a_miss(main_llm, tiny_model):
    concept = "preloaded concept about gardens"
    req = Req("preloaded", SHORT_B, concept, 1.0)
    s0 = main_llm.concept_stats()
    slots = main_llm.preload_concepts([concept])
    assert len(slots) == 1 and 1 <= slots[0] <= s0["capacity"]
    s1 = main_llm.concept_stats()
    assert s1["encoded"] == s0["encoded"] + 1
    first = run(main_llm, tiny_model, [req])[0]
    s2 = main_llm.concept_stats()
    assert s2["hits"] == s1["hits"] + 1, (s1, s2)
    assert s2["misses"] == s1["misses"]
    assert s2["encoded"] == s1["encoded"], "a preloaded concept was encoded again"
    assert main_llm.evict_concepts([concept]) == [True]
    assert concept not in [e["concept"] for e in main_llm.concept_stats()["concepts"]]
    second = run(main_llm, tiny_model, [req])[0]
    s3 = main_llm.concept_stats()
    assert s3["misses"] == s2["misses"] + 1, (s2, s3)
    assert s3["encoded"] == s2["encoded"] + 1
    assert_same(second, first, "after evict and re-encode")
    assert main_llm.evict_concepts(["never seen"]) == [False]
    assert main_llm.evict_concepts([concept]) == [True]  # unpinned now, free again


def test_steering_is_parsed_once_in_the_front_end(main_llm, tiny_model, solo):
    """The engine reads only the front end's canonical form: a client-sent one is overwritten, and a
    request whose flas_* fields bypassed the front end fails alone (never served unsteered)."""
    ids = {"prompt_token_ids": prompt_ids(tiny_model, SHORT_A)}
    fake = {"_flas": {"concept": LOVE, "flowtime": 8.0, "n_steps": 1}}
    out = main_llm.generate([ids], [sampling(extra=fake)], use_tqdm=False)[0]
    assert_same(Result.of(out), solo["unsteered-short"], "a client-sent canonical form is ignored")

    core = main_llm.llm_engine.engine_core
    original = core.add_request

    def bypass(request, *args, **kwargs):  # what a front end without the FLAS plugin would send
        request.sampling_params.extra_args.pop("_flas", None)
        return original(request, *args, **kwargs)

    core.add_request = bypass
    try:
        out = main_llm.generate([ids], [sampling(Req("x", SHORT_A, LOVE, 1.0))], use_tqdm=False)[0]
    finally:
        core.add_request = original
    assert out.outputs[0].finish_reason == "error" and not out.outputs[0].token_ids
    assert_same(run(main_llm, tiny_model, [Req("love-2.5", SHORT_A, LOVE, 2.5)])[0], solo["love-2.5"],
                "the engine keeps serving")


def test_memory_profiling_runs_the_flow_on_every_token(main_llm):
    """vLLM's CPU worker warms MAIN (compiled) up with its memory-profiling run, a dummy batch of
    max_num_batched_tokens that belongs to no request: FLAS steers all of it (patches/dummy_runs.py),
    so the measured peak includes the flow. No concept is encoded or referenced for it."""
    stats = main_llm.concept_stats()
    assert stats["flow_path"] == "skip"  # the flow runs eagerly there, so its rows are counted
    max_tokens = main_llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    assert stats["profile_flow_rows"] >= max_tokens
    assert "" not in [e["concept"] for e in stats["concepts"]]


def test_evict_right_after_the_request_finished(main_llm, tiny_model):
    """The worker hears of a finished request only with the engine's next step; an evict racing
    that step must not report the concept as in use once its request is gone."""
    for i in range(6):
        concept = f"a freshly finished concept {i}"
        run(main_llm, tiny_model, [Req(f"fresh-{i}", SHORT_A, concept, 1.0)], max_tokens=2)
        assert main_llm.evict_concepts([concept]) == [True], i
        assert concept not in [e["concept"] for e in main_llm.concept_stats()["concepts"]]


# ---------------------------------------------------------------------------
# VANILLA: unsteered / T=0 rows equal plain vLLM Gemma-2 on the same batch


@pytest.fixture(scope="class")  # class scope: shut down when TestVanilla is done
def vanilla(tiny_model):
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=str(tiny_model), dtype="float32", kv_cache_memory_bytes=KV_BYTES, seed=0)
    TIMINGS["vanilla (compiled) start"] = time.perf_counter() - t0
    yield llm
    shutdown_engine(llm)


class TestVanilla:
    def test_unsteered_rows_bit_identical_to_plain_gemma2(self, vanilla, tiny_model, mixed):
        plain = run(vanilla, tiny_model, MIXED, unsteered=True)
        checked = 0
        for req, got, want in zip(MIXED, mixed, plain):
            if not req.steered:
                assert_same(got, want, f"{req.name} vs plain vLLM Gemma-2")
                checked += 1
            else:
                assert got.token_ids != want.token_ids, f"{req.name} is not steered at all"
        assert checked >= 3

    def test_plain_model_rejects_flas_fields(self, vanilla, tiny_model):
        ids = {"prompt_token_ids": prompt_ids(tiny_model, SHORT_A)}
        with pytest.raises(ValueError, match="flas_concept|flas_flowtime"):
            vanilla.generate([ids], [sampling(extra={"flas_concept": LOVE, "flas_flowtime": 1.0})],
                             use_tqdm=False)
        assert len(run(vanilla, tiny_model, [Req("x", SHORT_A)])[0].token_ids) == MAX_TOKENS


# ---------------------------------------------------------------------------
# STRESS: chunked prefill + forced preemption leave outputs unchanged


def _metric(llm, name: str) -> float:
    total = 0.0
    for m in llm.get_metrics():
        if m.name == name:
            total += float(getattr(m, "value", 0) or 0)
    return total


@pytest.fixture(scope="class")
def stress(tiny_model, ckpt2):
    """MAIN's settings plus a 32-token step budget and 40 blocks of 32 tokens (all KV groups together)."""
    t0 = time.perf_counter()
    llm = start_flas(
        tiny_model, ckpt2, "stress (compiled)", max_concepts=MAX_CONCEPTS,
        enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=16,
        block_size=32, num_gpu_blocks_override=40, max_model_len=256,
        disable_log_stats=False,  # for the vllm:num_preemptions counter
    )
    yield llm
    TIMINGS["stress total"] = time.perf_counter() - t0
    shutdown_engine(llm)


class TestChunkedPrefillAndPreemption:
    def test_outputs_equal_main_engine(self, stress, tiny_model, solo):
        reqs = MIXED + [Req(r.name, r.text, r.concept, r.flowtime) for r in MIXED]  # twice: more pressure
        # prompts longer than the 32-token step budget can only be prefilled in chunks
        assert sum(len(prompt_ids(tiny_model, r.text)) > 32 for r in reqs) >= 8
        before = _metric(stress, "vllm:num_preemptions")
        outs = run(stress, tiny_model, reqs)
        preemptions = _metric(stress, "vllm:num_preemptions") - before
        for req, res in zip(reqs, outs):
            assert_same(res, solo[req.name], f"{req.name} under chunked prefill + preemption")
        assert preemptions > 0, "the small KV pool did not force any preemption"
        TIMINGS["stress preemptions"] = preemptions


    def test_seeded_sampling_is_unchanged_by_chunked_prefill(self, stress, main_llm, tiny_model):
        """vLLM 0.32's CPU runner died here (see patches/cpu_seeded_rewind.py); a seeded request must
        sample the same tokens whether its prompt was prefilled in one step or in 32-token chunks."""
        from vllm import SamplingParams

        reqs = [r for r in MIXED if len(prompt_ids(tiny_model, r.text)) > 32]
        assert len(reqs) >= 4

        def go(llm):
            params = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=MAX_TOKENS, ignore_eos=True,
                                     logprobs=1, extra_args=r.extra_args()) for i, r in enumerate(reqs)]
            outs = llm.generate([prompt_of(tiny_model, r) for r in reqs], params, use_tqdm=False)
            return [Result.of(o) for o in outs]

        chunked, whole = go(stress), go(main_llm)
        for req, a, b in zip(reqs, chunked, whole):
            assert_same(a, b, f"{req.name}, seeded sampling, chunked vs whole prefill")
        assert len({r.token_ids for r in whole}) > 1


# ---------------------------------------------------------------------------
# SLOTS: more distinct concepts in flight than concept slots


SLOT_CONCEPTS = [LOVE, OCEAN, LONG_CONCEPT, "anger", "music and dancing", "mathematics", "cats", "space travel"]


@pytest.fixture(scope="class")
def slots_llm(tiny_model, ckpt2):
    # max_pinned=0: exactly two concept slots in the table, no spare slots for preloads
    llm = start_flas(tiny_model, ckpt2, "slots (eager)", max_concepts=2, max_pinned=0, enforce_eager=True)
    yield llm
    shutdown_engine(llm)


class TestConceptSlots:
    def test_more_concepts_than_slots(self, slots_llm, tiny_model, ckpt2):
        texts = [SHORT_A, SHORT_B, MID, LONG]
        reqs = [Req(f"c{i}", texts[i % len(texts)], c, 0.5 + 0.5 * (i % 4)) for i, c in enumerate(SLOT_CONCEPTS)]
        reqs.insert(3, Req("plain", MID))
        reqs.append(Req("again-c0", LONG, SLOT_CONCEPTS[0], 3.0))
        assert len({r.concept for r in reqs if r.steered}) >= 6
        solo_res = {r.name: run(slots_llm, tiny_model, [r])[0] for r in reqs}
        ev0 = slots_llm.concept_stats()["evictions"]
        outs = run(slots_llm, tiny_model, reqs)
        stats = slots_llm.concept_stats()
        for req, res in zip(reqs, outs):
            assert_same(res, solo_res[req.name], f"{req.name} with 2 concept slots")
        assert stats["evictions"] > ev0, stats
        assert stats["capacity"] == 2 and stats["slots_in_use"] <= 2
        # and right, not just self-consistent: each equals the transformers path
        ref = hf_reference(hf_steerer(tiny_model, ckpt2), tiny_model, reqs)
        for req, res in zip(reqs, outs):
            assert_matches_hf(res, ref[req.name], f"{req.name} with 2 concept slots vs HF")


# ---------------------------------------------------------------------------
# GRAPH: the CUDA-graph-safe flow path (flow on every token, torch.where for unsteered tokens, the
# full-length concept gather), forced on CPU, under chunked prefill, preemption and the prefix cache


# the forced graph paths' engines: small steps (chunked prefill) and a KV cache small enough to preempt
GRAPH_ENGINE = dict(max_concepts=MAX_CONCEPTS, max_n_steps=MAX_N_STEPS, graph_path=True, enable_chunked_prefill=True,
                    max_num_batched_tokens=32, max_num_seqs=16, block_size=32, num_gpu_blocks_override=96,
                    max_model_len=512, disable_log_stats=False)


@pytest.fixture(scope="class")
def graph_llm(tiny_model, ckpt2):
    t0 = time.perf_counter()
    llm = start_flas(
        tiny_model, ckpt2, "graph path (compiled)", **GRAPH_ENGINE,
        # its workers can also publish steering through the Model Runner V2 model state (TestGraphPath's last test)
        worker_extension_cls="tests.v2_bridge.V2BridgeWorkerExtension",
    )
    yield llm
    TIMINGS["graph total"] = time.perf_counter() - t0
    shutdown_engine(llm)


GRAPH_REQS = MIXED + N_STEPS_MIX


def check_mixed_equals_solo(llm, tiny_model, own_solo, solo, label: str) -> None:
    """GRAPH_REQS twice in one batch (chunked prefill, a forced preemption) equal each run alone; unsteered and
    T=0 rows equal MAIN's, which TestVanilla pins to plain vLLM Gemma-2."""
    before = _metric(llm, "vllm:num_preemptions")
    twice = GRAPH_REQS + GRAPH_REQS
    for req, res in zip(twice, run(llm, tiny_model, twice)):
        assert_same(res, own_solo[req.name], f"{req.name} ({label}, mixed batch)")
    assert _metric(llm, "vllm:num_preemptions") > before, "no preemption was forced"
    for req in MIXED:
        if not req.steered:
            assert_same(own_solo[req.name], solo[req.name], f"{req.name} ({label}) vs plain Gemma-2")


def check_steered_matches_transformers(llm, tiny_model, ckpt, label: str) -> None:
    reqs = [r for r in MIXED + N_STEPS_MIX if r.steered]
    outs = run(llm, tiny_model, reqs)
    steerer = hf_steerer(tiny_model, ckpt)
    for req, res in zip(reqs, outs):
        ref = steerer.generate([prompt_ids(tiny_model, req.text)], req.concept, req.flowtime,
                               max_new_tokens=MAX_TOKENS, ignore_eos=True, n_steps=req.n_steps)[0]
        assert_matches_hf(res, ref, f"{req.name} ({label})")


@pytest.fixture(scope="class")
def graph_solo(graph_llm, tiny_model) -> dict[str, Result]:
    """Each request alone on the graph-path engine, its steering published by the V1 runner hook."""
    return {r.name: run(graph_llm, tiny_model, [r])[0] for r in GRAPH_REQS}


class TestGraphPath:
    def test_mixed_batch_equals_solo_under_chunked_prefill_and_preemption(self, graph_llm, main_llm, tiny_model,
                                                                           solo, graph_solo):
        assert graph_llm.concept_stats()["flow_path"] == "graph"
        assert main_llm.concept_stats()["flow_path"] == "skip"
        assert main_llm.concept_stats()["model_runner"] == "v1"
        check_mixed_equals_solo(graph_llm, tiny_model, graph_solo, solo, "graph path")

    def test_the_graph_path_runs_the_flow_on_every_token_and_counts_it(self, graph_llm, tiny_model):
        """The contrast with MAIN's skip path (test_mixed_batch_runs_the_flow_on_its_steered_tokens_only):
        traced into the graph, the flow computes every scheduled token of every step, unsteered ones too."""
        before = graph_llm.concept_stats()
        results = run(graph_llm, tiny_model, MIXED)
        after = graph_llm.concept_stats()
        delta = {k: after[k] - before[k] for k in ("flow_rows", "steered_tokens", "flow_steps")}
        scheduled = {r.name: len(prompt_ids(tiny_model, r.text)) - (res.num_cached_tokens or 0) + MAX_TOKENS - 1
                     for r, res in zip(MIXED, results)}
        assert delta["flow_steps"] >= MAX_TOKENS
        assert delta["flow_rows"] >= sum(scheduled.values())  # every token (more if a preemption recomputed some)
        assert delta["flow_rows"] > delta["steered_tokens"] >= sum(scheduled[r.name] for r in MIXED if r.steered)

    def test_steered_matches_transformers(self, graph_llm, tiny_model, ckpt2):
        check_steered_matches_transformers(graph_llm, tiny_model, ckpt2, "graph path")

    def test_prefix_cache_is_shared_only_by_identical_steering(self, graph_llm, tiny_model):
        a = Req("prefix-love", PREFIX_LONG, LOVE, 1.0)
        first, again = run(graph_llm, tiny_model, [a])[0], run(graph_llm, tiny_model, [a])[0]
        assert again.num_cached_tokens and again.num_cached_tokens >= 32
        assert_same(again, first, "prefix-cache hit on the graph path")
        other = run(graph_llm, tiny_model, [Req("prefix-ocean", PREFIX_LONG, OCEAN, 1.0)])[0]
        assert not other.num_cached_tokens, "a differently steered request reused steered KV"

    def test_model_runner_v2_state_steers_as_v1(self, graph_llm, tiny_model, graph_solo):
        """The V2 model state, fed V2's own objects made from each real step, publishes what V1 does.

        V2 cannot run on CPU (it needs Triton); `tests.v2_bridge` makes `NewRequestData`
        and `InputBatch` objects from each step of this engine, with request rows in scrambled order and
        requests missing from a step removed and added again (as V2 does on preemption), and lets
        `FlasModelState` publish the step's steering. Outputs must equal the V1-published solo runs.
        """
        rpc = graph_llm.llm.collective_rpc
        rpc("flas_test_v2_install", args=(7,))
        try:
            twice = GRAPH_REQS + GRAPH_REQS
            before = _metric(graph_llm, "vllm:num_preemptions")
            steered_before = graph_llm.concept_stats()["steered_requests"]
            for req, res in zip(twice, run(graph_llm, tiny_model, twice)):
                assert_same(res, graph_solo[req.name], f"{req.name} (V2 model state, mixed batch)")
            assert _metric(graph_llm, "vllm:num_preemptions") > before, "no preemption was forced"
            # a request added again after a gap is the same request, not a new steered one
            steered = graph_llm.concept_stats()["steered_requests"] - steered_before
            assert steered == sum(r.steered for r in twice)
            counts = rpc("flas_test_v2_counts")[0]
            assert counts["steps"] > 0 and counts["added"] == len(twice) and counts["readded"] > 0, counts
            assert counts["removed"] == counts["added"] + counts["readded"], counts  # all finished
            first = counts["rows"][:8]
            assert first != sorted(first), counts  # rows handed out in V2's free-list order, not batch order
            assert counts["staging_depth"] == 2, counts  # round-robin host staging under V2
            # a dummy batch (profiling, CUDA-graph capture) names rows that live steered requests own
            published = rpc("flas_test_v2_dummy_step", args=(LOVE, 3, 7))[0]
            assert published["dummy"] == {"any_steered": False, "steered_tokens": 0, "rows": [0, 1, 2]}
            assert published["live"] == {"any_steered": True, "steered_tokens": 7, "rows": [0, 1, 2]}
        finally:
            rpc("flas_test_v2_uninstall")
        # and V1 publishes again afterwards
        res = run(graph_llm, tiny_model, [MIXED[2]])[0]
        assert_same(res, graph_solo[MIXED[2].name], "V1 again after the V2 bridge")


# ---------------------------------------------------------------------------
# the bucketed graph path: what FULL CUDA graphs keyed by the steered bucket run (flow_graphs="bucketed")

BUCKET_MIN = 4  # FLAS_VLLM_GRAPH_BUCKET_MIN for this engine: buckets below its 32-token steps


def expected_bucket(steered: int, tokens: int) -> int:
    """The ladder as graph_buckets.py documents it: {0, N} and N/8, N/4, N/2 (rounded up) of at least BUCKET_MIN."""
    ladder = {0, tokens} | {-(-tokens // f) for f in (8, 4, 2) if -(-tokens // f) >= BUCKET_MIN}
    return min(b for b in ladder if b >= steered)


@pytest.fixture(scope="class")
def bucketed_llm(tiny_model, ckpt2):
    from flas_vllm.engine.graph_buckets import MIN_BUCKET_ENV

    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(MIN_BUCKET_ENV, str(BUCKET_MIN))  # read once, when the engine builds its model
        llm = start_flas(tiny_model, ckpt2, "bucketed graph path", flow_graphs="bucketed", **GRAPH_ENGINE)
    yield llm
    TIMINGS["bucketed total"] = time.perf_counter() - t0
    shutdown_engine(llm)


@pytest.fixture(scope="class")
def bucketed_solo(bucketed_llm, tiny_model) -> dict[str, Result]:
    return {r.name: run(bucketed_llm, tiny_model, [r])[0] for r in GRAPH_REQS}


class TestBucketedGraphPath:
    """Every step run as a FULL graph captured for its steered bucket would run it (graph_path forces it on
    CPU, where no graph is captured): the flow on the bucket's rows, graph-safe, at max Euler steps masked
    to each request's own."""

    def test_mixed_batch_equals_solo_and_unsteered_equals_plain_gemma2(self, bucketed_llm, tiny_model, solo,
                                                                       bucketed_solo):
        assert bucketed_llm.concept_stats()["flow_path"] == "bucketed"
        check_mixed_equals_solo(bucketed_llm, tiny_model, bucketed_solo, solo, "bucketed graph path")

    def test_each_step_computes_its_steered_bucket(self, bucketed_llm, tiny_model):
        """The issue's counter: per step, the flow's rows are the steered tokens rounded up to the bucket."""
        rpc = bucketed_llm.llm.collective_rpc
        logged = len(rpc("flas_flow_log")[0])
        before = bucketed_llm.concept_stats()
        results = run(bucketed_llm, tiny_model, MIXED)
        after = bucketed_llm.concept_stats()
        steps = rpc("flas_flow_log")[0][logged:]
        assert steps and len(steps) == after["flow_steps"] - before["flow_steps"]
        for tokens, steered, rows in steps:
            assert 0 < steered <= rows == expected_bucket(steered, tokens), (tokens, steered, rows)
        assert any(rows < tokens for tokens, _, rows in steps), "no step ran fewer rows than tokens"
        assert after["flow_rows"] - before["flow_rows"] == sum(rows for _, _, rows in steps)
        scheduled = {r.name: len(prompt_ids(tiny_model, r.text)) - (res.num_cached_tokens or 0) + MAX_TOKENS - 1
                     for r, res in zip(MIXED, results)}
        assert after["steered_tokens"] - before["steered_tokens"] == sum(scheduled[r.name] for r in MIXED if r.steered)

    def test_steered_matches_transformers(self, bucketed_llm, tiny_model, ckpt2):
        check_steered_matches_transformers(bucketed_llm, tiny_model, ckpt2, "bucketed graph path")
