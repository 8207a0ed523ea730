"""The flow's activation memory at vLLM's default 16384 batched tokens, at real Gemma-2 geometry: torch only.

Runs the engine's own flow (1 block, 3 Euler steps) and concept slot table on
the graph path (every token gathers its concept's keys and values), and one
Gemma-2 decoder layer, on PyTorch's "meta" device: real shapes and dtypes, no
data, no compute, so 9B geometry at 16384 tokens takes a second on any laptop.
A dispatch hook records every storage allocated and freed and reports the peak
of live bytes. The self-attention core (vLLM's paged attention) is stood in by
its output allocation alone.

"Extra" is the flow's peak beyond the decoder layer's own: the part of the
flow's activations that vLLM's profiling run does not already reserve for the
base model. Target (issue 21): at most 64 MiB at 2B and 9B in bf16. It measures eager code, where
each intermediate's lifetime is the code's; a compiled graph plans its own buffers.

    python benchmarks/flow_memory.py [--tokens 16384] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ceiling import FLOW, GEOMETRIES, Gemma2Layer  # noqa: E402

from flas_vllm.core.flow import FlowFunction, integrate, rope_cos_sin  # noqa: E402
from flas_vllm.engine.flow_linears import prepare_engine_linears, use_engine_linears  # noqa: E402
from flas_vllm.engine.slot_table import SlotTableKV  # noqa: E402
from flas_vllm.engine.step_state import StepState  # noqa: E402

MIB = 1 << 20
TARGET_EXTRA_MIB = 64


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of storages allocated inside the region and still alive (views counted once)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.now -= nbytes
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self.live:
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        return out


def _output_only(q, k, v):
    return torch.empty_like(q)  # what paged attention allocates


def _peak(fn) -> int:
    tracker = PeakLiveBytes()
    with torch.inference_mode(), tracker:
        fn()
    return tracker.peak


def measure(name: str, tokens: int, concepts: int, dtype: torch.dtype) -> dict:
    g, _ = GEOMETRIES[name]
    with torch.device("meta"):
        flow = FlowFunction(g, FLOW).to(dtype)
        use_engine_linears(flow, platform_gemm=False)  # as a GPU engine runs it: q/k/v and gate/up fused
        prepare_engine_linears(flow)
        layer = Gemma2Layer(g).to(dtype)
        h = torch.empty(tokens, g.hidden_size, dtype=dtype)
        positions = torch.zeros(tokens, dtype=torch.long)
        dt = torch.empty(tokens, dtype=dtype)
        q = torch.empty(tokens, g.num_heads, g.head_dim, dtype=dtype)
    state = StepState.allocate(tokens, dtype, "meta")  # no groups: the graph path's full-length gathers
    table = SlotTableKV(g, FLOW.num_blocks, concepts, FLOW.concept_max_len, dtype, "meta", state=state)
    cores = [[_output_only] * FLOW.num_blocks for _ in range(FLOW.n_steps)]
    cos, sin = rope_cos_sin(positions, g.head_dim, g.rope_theta, dtype)
    token_steps = torch.full((tokens,), FLOW.n_steps, dtype=torch.int32, device="meta")  # as the engine passes
    flow_peak = _peak(lambda: integrate(flow, h, dt, FLOW.n_steps, positions, table, cores, token_steps))
    layer_peak = _peak(lambda: layer(h, cos, sin, _output_only))
    attend_peak = _peak(lambda: table.attend(0, q))
    return {"geometry": name, "tokens": tokens, "dtype": str(dtype).replace("torch.", ""),
            "flow_peak_mib": flow_peak / MIB, "layer_peak_mib": layer_peak / MIB,
            "cross_attention_peak_mib": attend_peak / MIB, "extra_mib": max(0, flow_peak - layer_peak) / MIB}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="batched tokens per step (vLLM's GPU default 16384)")
    p.add_argument("--concepts", type=int, default=80, help="concept slots (default: 64 + 16 pinned)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.concepts < 1:
        p.error("--tokens and --concepts must be >= 1")
    rows = [measure(name, args.tokens, args.concepts, getattr(torch, args.dtype)) for name in GEOMETRIES]
    print(f"{'geometry':<12} {'tokens':>6} {'flow MiB':>9} {'layer MiB':>9} {'cross MiB':>9} {'extra MiB':>9}")
    for r in rows:
        verdict = "ok" if r["extra_mib"] <= TARGET_EXTRA_MIB else f"over the {TARGET_EXTRA_MIB} MiB target"
        print(f"{r['geometry']:<12} {r['tokens']:>6} {r['flow_peak_mib']:>9.0f} {r['layer_peak_mib']:>9.0f} "
              f"{r['cross_attention_peak_mib']:>9.0f} {r['extra_mib']:>9.0f}  {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
