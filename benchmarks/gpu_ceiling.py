"""The GPU throughput ceiling of FLAS steering, from kernels alone: torch only, no vLLM.

Times, at Gemma-2-2B and 9B geometry (bf16), for 1 to 8192 tokens per step:
the flow (1 block, 3 Euler steps, the engine's own modules and concept slot
table on its graph path), one Gemma-2 decoder layer, and one block's concept
cross-attention on each path (FlexAttention over the table, the engine's choice
on CUDA, and the per-token gather, the CPU's). Prints per token: flow /
(num_layers x layer), and the ceiling base / (base + flow) that a steered step
cannot beat (the LM head, embedding and sampling are left out of "base", so the
real ceiling is a little higher).

As vLLM runs a step on a GPU (default `--mode graphs`): flow and layer compiled
with Inductor once per geometry (symbolic sizes), then captured in a CUDA graph
per token count and replayed. `--mode compiled` skips the capture, `--mode eager`
the compile (the CPU default). One flow call also runs under torch.profiler:
milliseconds in GEMMs (the projections' mm/addmm), in concept attention (a
profiler range around each attend) and the rest, and the kernels it launches
(on CPU: leaf operators).

Attention (the decoder layer's and the flow's causal self-attention) is torch's
SDPA over sequences of --seq-len tokens, for both, so the ratio is fair; the
soft-cap is left out of both (FlashAttention applies it in-kernel).

    python benchmarks/gpu_ceiling.py --json gpu.json   # one GPU: one prepared run, under 5 minutes
    python benchmarks/gpu_ceiling.py --concept gather  # the flow with the gather path, to compare
    python benchmarks/gpu_ceiling.py --mode eager      # no compile, no graphs
    python benchmarks/gpu_ceiling.py --quick           # tiny geometry on CPU: a smoke test
    python benchmarks/gpu_ceiling.py --workspace-mib 1000000   # one unbounded concept gather, to compare
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flas_vllm.core.config import FlasConfig, FlowGeometry
from flas_vllm.core.flow import FlowFunction, RMSNorm, activation, euler_dt, integrate
from flas_vllm.engine.concept_attention import FlexSlotAttention
from flas_vllm.engine.flow_linears import prepare_engine_linears, use_engine_linears
from flas_vllm.engine.slot_table import SlotTableKV
from flas_vllm.engine.step_state import StepState
from flas_vllm.engine.time_table import TimeTable


def _gemma2(hidden, inter, heads, kv_heads, layers) -> tuple[FlowGeometry, int]:
    return FlowGeometry(hidden_size=hidden, intermediate_size=inter, num_heads=heads, num_kv_heads=kv_heads,
                        head_dim=256 if hidden > 256 else 16, num_hidden_layers=layers, rms_norm_eps=1e-6,
                        rope_theta=10000.0, query_pre_attn_scalar=256 if hidden > 256 else 16,
                        attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh",
                        attention_bias=False), layers


GEOMETRIES = {  # Gemma-2 configs (hidden, intermediate, heads, kv heads, layers)
    "gemma-2-2b": _gemma2(2304, 9216, 8, 4, 26),
    "gemma-2-9b": _gemma2(3584, 14336, 16, 8, 42),
}
QUICK_GEOMETRIES = {"tiny": _gemma2(64, 128, 4, 2, 4)}
TOKENS = (1, 8, 64, 512, 2048, 8192)
QUICK_TOKENS = (1, 8, 64)
FLOW = FlasConfig(num_blocks=1, n_steps=3, concept_max_len=64)


class Gemma2Layer(nn.Module):
    """One Gemma-2 decoder layer's compute (four RMSNorms, attention, gated MLP), from the flow's own parts."""

    def __init__(self, g: FlowGeometry):
        super().__init__()
        from flas_vllm.core.flow import FlowSelfAttention

        h = g.hidden_size
        self.norms = nn.ModuleList(RMSNorm(h, g.rms_norm_eps) for _ in range(4))
        self.attn = FlowSelfAttention(g)
        self.gate_up = nn.Linear(h, 2 * g.intermediate_size, bias=False)  # merged, as vLLM runs it
        self.down = nn.Linear(g.intermediate_size, h, bias=False)
        self.act = activation(g.hidden_activation)

    def forward(self, x, cos, sin, core):
        x = x + self.norms[1](self.attn(self.norms[0](x), cos, sin, core))
        gate, up = self.gate_up(self.norms[2](x)).chunk(2, dim=-1)
        return x + self.norms[3](self.down(self.act(gate) * up))


class CausalSDPA:
    """Causal self-attention over [B, S] token blocks: q [B, S, nH*D], k/v [B, S, nKV*D]."""

    def __init__(self, g: FlowGeometry):
        self.g = g

    def __call__(self, q, k, v):
        g = self.g
        b, s = q.shape[:2]
        q = q.view(b, s, g.num_heads, g.head_dim).transpose(1, 2)
        k = k.view(b, s, g.num_kv_heads, g.head_dim).transpose(1, 2)
        v = v.view(b, s, g.num_kv_heads, g.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=g.query_pre_attn_scalar ** -0.5,
                                             enable_gqa=True)
        return out.transpose(1, 2).reshape(b, s, -1)


@dataclass
class Case:
    name: str
    g: FlowGeometry
    layers: int
    flow: FlowFunction
    layer: Gemma2Layer
    table: SlotTableKV
    device: torch.device
    dtype: torch.dtype
    compiled: tuple = ()  # (flow(h, dts, positions), layer(h, cos, sin)) as the mode runs them
    times: TimeTable | None = None  # the engine's time embeddings: row 1 holds the step size every token runs
    time_rows: torch.Tensor | None = None  # each token's row (all 1), persistent as the engine's per-token buffer
    flex_in_flow: bool = True  # False: the flow's concept attention is the gather even on CUDA

    def prepare(self, mode: str) -> None:
        torch._dynamo.reset()
        core = CausalSDPA(self.g)
        cores = [[core] * FLOW.num_blocks for _ in range(FLOW.n_steps)]
        concept = _LabelledConcept(self.table)
        self.compiled = (
            compile_for(lambda h, dts, pos: integrate(self.flow, h, dts, FLOW.n_steps, pos, concept, cores,
                                                      time_embedding=self._time_embedding(pos)), mode),
            compile_for(lambda h, cos, sin: self.layer(h, cos, sin, core), mode),
        )


    def _time_embedding(self, positions: torch.Tensor):
        """As the engine reads it: every token's row of the table (one step size here: row 1), from a buffer."""
        rows = self.time_rows[: positions.numel()].view(positions.shape)
        return lambda k: self.times.at(rows, k)


TIME_ROWS = 16  # step sizes the cases' requests may hold at once (gpu_bucketed_graphs: 4 flowtimes x Euler steps)


def attach_step_state(case: Case, max_tokens: int) -> StepState:
    """The engine's per-step state on the case's table, with the case's time table; its FlexAttention buffers (if
    any) reserved for it, as the engine's table does when built: never grown inside a trace or a capture."""
    state = case.table.state = StepState.allocate(max_tokens, case.dtype, case.device)
    state.times = case.times
    case.time_rows = torch.ones(max_tokens, dtype=torch.long, device=case.device)
    if case.table.flex is not None:
        case.table.flex.reserve(max_tokens)
    return state


def build(name: str, g: FlowGeometry, layers: int, device, dtype, concepts: int) -> Case:
    torch.manual_seed(0)
    with torch.device(device):
        flow = FlowFunction(g, FLOW).to(dtype).eval()
        layer = Gemma2Layer(g).to(dtype).eval()
        for module in (flow, layer):
            for p in module.parameters():
                nn.init.normal_(p, std=0.02)
        use_engine_linears(flow, platform_gemm=False)  # as a GPU engine runs it: q/k/v and gate/up fused
        prepare_engine_linears(flow)
    table = SlotTableKV(g, FLOW.num_blocks, concepts, FLOW.concept_max_len, dtype, device)
    with torch.no_grad():
        for slot in range(1, concepts + 1):
            c = torch.randn(FLOW.concept_max_len, g.hidden_size, device=device, dtype=dtype)
            table.write(slot, flow.project_concept(c))
    times = TimeTable(TIME_ROWS, FLOW.n_steps, g.hidden_size, dtype, device)
    times.acquire(float(euler_dt(1.0, FLOW.n_steps, dtype)), flow)  # the dts `measure` runs: row 1
    return Case(name, g, layers, flow, layer, table, torch.device(device), dtype, times=times)


def _shape(n: int, seq_len: int) -> tuple[int, int]:
    s = min(n, seq_len)
    return max(1, n // s), s  # [B, S] blocks of tokens; B*S == n for the powers of two used here


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


MODES = ("graphs", "compiled", "eager")
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::_addmm_activation")  # the projections; the gather's bmm is concept
CONCEPT_RANGE = "flas.concept_attention"  # eager: a profiler range; compiled: the opaque ops below
CONCEPT_OPS = ("flas::attend_slots", "flas::attend_slots_flex")


def compile_for(fn, mode: str):
    """fn, or torch.compile(fn) with Inductor and symbolic sizes: compiled once per geometry, as vLLM
    compiles the model once and then captures a CUDA graph per batch size."""
    if mode == "eager":
        return fn
    torch._inductor.config.cpp.enable_kernel_profile = True  # CPU kernels visible to the profiler
    return torch.compile(fn, dynamic=True)


def capture(fn, mode: str, device: torch.device):
    """What the benchmark times: fn() as is (eager, compiled), or captured in a CUDA graph (graphs)."""
    if mode != "graphs":
        return fn
    if device.type != "cuda":
        raise ValueError("--mode graphs needs a CUDA device")
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class _LabelledConcept:
    """The case's slot table with every attend inside a profiler range, so its kernels can be grouped."""

    def __init__(self, table: SlotTableKV):
        self.table = table

    def attend(self, block, q):
        with torch.profiler.record_function(CONCEPT_RANGE):
            return self.table.attend(block, q)


NO_KERNEL = {f"aten::{op}" for op in (
    "as_strided", "resolve_conj", "resolve_neg", "empty", "empty_strided", "empty_like", "view", "_unsafe_view",
    "_reshape_alias", "lift_fresh", "reshape", "transpose", "expand", "select", "slice", "unsqueeze", "squeeze",
    "permute", "t", "detach", "alias", "contiguous", "to", "_to_copy", "chunk", "split", "unbind", "narrow")}


def _is_cpu_kernel(event) -> bool:
    """A CPU profiler event that is one kernel: an operator doing work (not a view or an allocation)
    none of whose callees is one, or one of Inductor's C++ kernels (cpp_fused_*)."""
    if event.name in NO_KERNEL or event.name == CONCEPT_RANGE:
        return False
    if not (event.name.startswith("aten::") or "cpp_fused" in event.name):
        return False
    return not any(_is_cpu_kernel(child) for child in event.cpu_children)


def breakdown(fn, device: torch.device) -> dict:
    """One call of fn under torch.profiler: ms in GEMMs, concept attention, the rest; kernels launched.

    On a GPU the times are device (kernel) times and the count is CUDA kernels; on CPU, operators'
    own CPU time and the count is leaf operators (the CPU's kernels)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    _sync(device)
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    events = prof.key_averages()
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total_us = sum(own(e) for e in events)
    gemm_us = sum(own(e) for e in events if e.key in GEMM_OPS)
    concept = [e for e in events if e.key == CONCEPT_RANGE] or [e for e in events if e.key in CONCEPT_OPS]
    concept_us = sum((e.device_time_total if cuda else e.cpu_time_total) for e in concept)
    if cuda:
        kernels = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
    else:
        kernels = sum(1 for e in prof.events() if _is_cpu_kernel(e))
    return {"gemm_ms": gemm_us / 1e3, "concept_ms": concept_us / 1e3,
            "other_ms": max(0.0, total_us - gemm_us - concept_us) / 1e3, "kernels_per_flow": kernels}


@torch.inference_mode()
def measure(case: Case, n: int, seq_len: int, concepts: int, warmup: int, reps: int, mode: str) -> dict:
    g, dev, dt = case.g, case.device, case.dtype
    b, s = _shape(n, seq_len)
    h = torch.randn(b, s, g.hidden_size, device=dev, dtype=dt)
    positions = torch.arange(s, device=dev).expand(b, s)
    slots = (torch.arange(b * s, device=dev) % concepts) + 1  # every token steered, concepts round robin
    case.table.state.buffers.slot[: b * s].copy_(slots)  # one buffer for every size, as the engine's
    case.table.state.groups = None  # the graph path: one full-length gather
    dts = torch.full((b, s), 1.0 / FLOW.n_steps, device=dev, dtype=dt)
    from flas_vllm.core.flow import rope_cos_sin

    cos, sin = rope_cos_sin(positions, g.head_dim, g.rope_theta, dt)
    q = torch.randn(b * s, g.num_heads, g.head_dim, device=dev, dtype=dt)
    flow_fn, layer_fn = case.compiled
    flex = case.table.flex
    case.table.flex = flex if case.flex_in_flow else None
    flow = lambda: flow_fn(h, dts, positions)  # noqa: E731
    flow_ms = timed(capture(flow, mode, dev), dev, warmup, reps)
    parts = breakdown(flow, dev)  # the compiled call itself: a graph replay hides its kernels
    layer_ms = timed(capture(lambda: layer_fn(h, cos, sin), mode, dev), dev, warmup, reps)
    cross, outputs = {}, {}
    for name, kernel in (("flex", flex), ("gather", None)):  # one block's concept attention, each path
        if name == "flex" and flex is None:
            continue  # not a CUDA table: the exact gather is the only path
        case.table.flex = kernel
        cross[f"cross_{name}_ms"] = timed(lambda: case.table.attend(0, q), dev, warmup, reps)
        outputs[name] = case.table.attend(0, q).float()
    case.table.flex = flex
    if "flex" in outputs:  # the two paths on the same queries (bf16: different rounding, same math)
        cross["cross_flex_max_abs_diff"] = (outputs["flex"] - outputs["gather"]).abs().max().item()
    base_ms = case.layers * layer_ms
    return {"geometry": case.name, "tokens": n, "mode": mode, "flow_ms": flow_ms,
            "cross_attention_ms": cross.get("cross_flex_ms", cross["cross_gather_ms"]), **cross, **parts,
            "layer_ms": layer_ms, "flow_over_base": flow_ms / base_ms, "ceiling": base_ms / (base_ms + flow_ms)}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny geometry, few token counts and repeats (CPU smoke)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--tokens", default=None, help="comma-separated tokens per step (default 1..8192)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per causal sequence in a step (default 512)")
    p.add_argument("--concepts", type=int, default=64, help="distinct concepts in the slot table (default 64)")
    p.add_argument("--workspace-mib", type=int, default=None,
                   help="concept gather workspace (default: the engine's); a huge value times one gather")
    p.add_argument("--mode", choices=MODES, default=None,
                   help="graphs: Inductor + CUDA graphs, as vLLM runs (default on CUDA); compiled: Inductor "
                        "alone; eager (default on CPU)")
    p.add_argument("--concept", choices=("auto", "gather", "flex"), default="auto",
                   help="the flow's concept attention: auto (FlexAttention on CUDA, whatever the engine's "
                        "opt-in; the gather elsewhere), the gather, or FlexAttention on any device (CPU: "
                        "compiled per shape)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mode = args.mode or ("graphs" if device.type == "cuda" else "eager")
    if mode == "graphs" and device.type != "cuda":
        p.error("--mode graphs needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    geometries = QUICK_GEOMETRIES if args.quick else GEOMETRIES
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(QUICK_TOKENS if args.quick else TOKENS)
    if any(t < 1 for t in tokens) or args.seq_len < 1 or args.concepts < 1 or (args.workspace_mib or 1) < 1:
        p.error("--tokens, --seq-len, --concepts and --workspace-mib must be >= 1")
    warmup, reps = (1, 2) if args.quick else (3, 10)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({device_name}), "
          f"{args.dtype}, flow: {FLOW.num_blocks} block, {FLOW.n_steps} steps, {args.concepts} concepts of "
          f"{FLOW.concept_max_len} keys, sequences of {args.seq_len} tokens, mode {mode}")
    print("cross: one block's concept attention (flex | gather); gemm/concept/other: one flow call under the "
          "profiler (compiled unless eager), kernels: launched per flow call (CPU: leaf operators)")
    print(f"{'geometry':<12} {'tokens':>6} {'flow ms':>9} {'layer ms':>9} {'flow/base':>9} {'ceiling':>8} "
          f"{'flex ms':>8} {'gather ms':>9} {'gemm ms':>8} {'concept':>8} {'other':>8} {'kernels':>7}")
    rows = []
    for name, (g, layers) in geometries.items():
        case = build(name, g, layers, device, dtype, args.concepts)
        if args.workspace_mib is not None:
            case.table.workspace_bytes = args.workspace_mib << 20
        case.flex_in_flow = args.concept != "gather"
        on_cuda = torch.device(device).type == "cuda"
        if case.table.flex is None and (args.concept == "flex" or (args.concept == "auto" and on_cuda)):
            # both paths are measured whatever FLAS_VLLM_CONCEPT_ATTENTION says (the engine's opt-in)
            case.table.flex = FlexSlotAttention(args.concepts + 1, g.num_heads, FLOW.concept_max_len,
                                                g.attn_logit_softcapping, device, dynamic=on_cuda,
                                                num_kv_heads=g.num_kv_heads)
        attach_step_state(case, max(tokens))
        case.prepare(mode)
        for n in tokens:
            row = measure(case, n, args.seq_len, args.concepts, warmup, reps, mode)
            rows.append(row)
            flex = f"{row['cross_flex_ms']:>8.3f}" if "cross_flex_ms" in row else f"{'-':>8}"
            diff = f" (flex - gather max abs {row['cross_flex_max_abs_diff']:.3g})" if "cross_flex_ms" in row else ""
            print(f"{name:<12} {n:>6} {row['flow_ms']:>9.3f} {row['layer_ms']:>9.3f} {row['flow_over_base']:>9.4f} "
                  f"{row['ceiling']:>8.4f} {flex} {row['cross_gather_ms']:>9.3f} {row['gemm_ms']:>8.3f} "
                  f"{row['concept_ms']:>8.3f} {row['other_ms']:>8.3f} {row['kernels_per_flow']:>7}{diff}", flush=True)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(device), "device_name": device_name, "dtype": args.dtype, "mode": mode,
                       "concept": args.concept, "rows": rows}, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
