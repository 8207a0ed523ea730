"""What a FULL CUDA graph keyed by the steered bucket (`flow_graphs="bucketed"`) runs, captured and replayed:
torch only, no vLLM.

The engine's bucketed graphs have never been captured on a GPU (no GPU with vLLM was at hand); this script
captures their flow where vLLM cannot be installed. For each token count N and each bucket b > 0 of
`flow_row_buckets(N)`, the op's graph-safe flow on b rows (`flow_rows.integrate_graph_rows`: the step's graph
row order and steering read from the engine's persistent `StepState` buffers, staged by `build_step`) is
captured once in a CUDA graph, after the warm-up runs the engine also makes. Then several steps with other
steered tokens, concepts, flowtimes and Euler steps are staged and the graph replayed:
- checks: the capture succeeds (nothing reads the device on the host), and every replay gives the steered
  tokens what the same step run eagerly gives them (bit for bit expected, as the same kernels; passed within
  1% of how far the flow moved them), which a graph reading stale buffers would not;
- times: each bucket's replay against the traced flow (compiled, captured, every token at max Euler steps),
  what FULL graphs run by default (`flow_graphs="traced"`), and the eager flow's cost before capture.
The flow's paged self-attention is torch's SDPA over requests of --seq-len tokens (vLLM's attention is not here);
Gemma-2-2B geometry, bf16, 1 block, 3 Euler steps, 64 concepts.

    python benchmarks/gpu_bucketed_graphs.py --json bucketed.json   # one GPU: one prepared run (~2 min, estimated)
    python benchmarks/gpu_bucketed_graphs.py --quick                # tiny geometry on CPU, no capture: a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_ceiling.py beside this script
from gpu_ceiling import (FLOW, GEOMETRIES, QUICK_GEOMETRIES, CausalSDPA, attach_step_state, build,  # noqa: E402
                         TIME_ROWS, capture, compile_for, timed)

from flas_vllm.core.flow import integrate  # noqa: E402
from flas_vllm.core.steering import Steering  # noqa: E402
from flas_vllm.engine.flow_rows import integrate_graph_rows  # noqa: E402
from flas_vllm.engine.graph_buckets import flow_row_buckets  # noqa: E402
from flas_vllm.engine.step_state import RequestRow, StepRows, StepState, build_step, request_row  # noqa: E402

TOKENS = (64, 256, 512)
QUICK_TOKENS = (16, 32)
QUICK_SMALLEST = 4  # the quick run's smallest bucket (the engine's is 64: graph_buckets.min_bucket)
STEPS_CHECKED = 3
# A replay passes within this fraction of how far the flow moved the steered tokens: bit-equal is expected (the
# same kernels) and recorded, but a graph's kernels may round apart from eager's; stale steering moves them far.
REPLAY_TOLERANCE = 0.01


class SegmentCausalSDPA:
    """The flow's self-attention core on a flat step [N, ...]: requests of `seq_len` tokens, causal each."""

    def __init__(self, g, seq_len: int):
        self.inner, self.seq_len = CausalSDPA(g), seq_len

    def __call__(self, q, k, v):
        n = q.shape[0]
        b, s = n // self.seq_len, self.seq_len
        return self.inner(q.view(b, s, -1), k.view(b, s, -1), v.view(b, s, -1)).reshape(n, -1)


FLOWTIMES = (0.5, 1.0, 2.0, 4.0)  # a few step sizes: each holds a row of the time table for the whole run
assert len(FLOWTIMES) * FLOW.n_steps < TIME_ROWS, "every (flowtime, Euler steps) needs its own row"


def step_rows(rng: np.random.Generator, n_requests: int, steered: int, concepts: int, case) -> list[RequestRow]:
    """`steered` requests (chosen at random) with random concepts, flowtimes and Euler steps, each holding its
    step size's row of the time table as the engine's requests do; the rest unsteered."""
    chosen = set(rng.choice(n_requests, size=steered, replace=False).tolist())
    rows = []
    for i in range(n_requests):
        if i not in chosen:
            rows.append(RequestRow())
            continue
        steer = Steering(f"c{i}", float(rng.choice(FLOWTIMES)), int(rng.integers(1, FLOW.n_steps + 1)))
        row = request_row(steer, int(rng.integers(1, concepts + 1)), FLOW.n_steps, case.dtype)
        rows.append(dataclasses.replace(row, time_row=case.times.acquire(row.dt, case.flow)))
    return rows


@torch.inference_mode()
def measure(case, state: StepState, n: int, seq_len: int, concepts: int, mode: str, smallest: int | None,
            warmup: int, reps: int, seed: int) -> list[dict]:
    """One row per bucket b > 0 of N tokens: the bucket's replay checked against eager steps, and timed."""
    g, dev, dt = case.g, case.device, case.dtype
    s = min(seq_len, n)
    n_requests = n // s
    positions = torch.arange(s, device=dev).repeat(n_requests)
    stream = torch.randn(n, g.hidden_size, device=dev, dtype=dt)
    core = SegmentCausalSDPA(g, s)
    cores = [[core] * FLOW.num_blocks for _ in range(FLOW.n_steps)]
    case.table.state = state
    rng = np.random.default_rng(seed)

    def stage(steered_requests: int) -> StepState:
        rows = step_rows(rng, n_requests, steered_requests, concepts, case)
        return build_step(state, StepRows.of(rows, [s] * n_requests))

    def flow_on(b: int, out: torch.Tensor):
        return lambda: integrate_graph_rows(case.flow, case.table, cores, state, positions, stream, FLOW.n_steps, b, out)

    traced = compile_for(lambda h, dts, pos: integrate(
        case.flow, h, dts, FLOW.n_steps, pos, case.table, cores, token_steps=state.buffers.euler_steps[:n],
        time_embedding=lambda k: case.times.at(state.buffers.time_row[:n], k)), mode)  # as integrate_rows reads it
    stage(n_requests)
    with state.flow_on_rows(None, None):  # the traced flow: every token's slot, full length
        traced_ms = timed(capture(lambda: traced(stream, state.buffers.dt[:n], positions), mode, dev), dev,
                          warmup, reps)
    out_rows = []
    for b in (b for b in flow_row_buckets(n, smallest) if b > 0):
        most = b // s  # requests whose tokens fit the bucket
        if not most:
            continue  # a bucket smaller than one request: no whole request fits
        stage(most)  # the step the graph is captured with
        graph_out = torch.empty_like(stream)
        eager_ms = timed(flow_on(b, graph_out), dev, warmup, reps)
        try:
            replay = capture(flow_on(b, graph_out), mode, dev)
        except Exception as exc:  # what the engine's capture would meet: recorded, the next buckets still tried
            out_rows.append({"tokens": n, "bucket": b, "eager_ms": eager_ms, "traced_every_token_ms": traced_ms,
                             "capture_error": f"{type(exc).__name__}: {exc}", "checks": [], "passed": False})
            continue
        checks = []
        for k in range(STEPS_CHECKED):
            state_now = stage(int(rng.integers(1, most + 1)) if k else most)
            steered = state_now.buffers.graph_rows[: state_now.steered_rows].clone()
            replay()
            got = graph_out.index_select(0, steered).clone()
            want_out = torch.empty_like(stream)
            flow_on(b, want_out)()
            want = want_out.index_select(0, steered)
            moved = float((want.float() - stream.index_select(0, steered).float()).abs().max())
            diff = float((got.float() - want.float()).abs().max())
            checks.append({"steered_tokens": int(steered.numel()), "equal": bool(torch.equal(got, want)),
                           "max_abs_diff": diff, "flow_moved_max_abs": moved,
                           "passed": moved > 0 and diff <= REPLAY_TOLERANCE * moved})
        replay_ms = timed(replay, dev, warmup, reps)
        out_rows.append({"tokens": n, "bucket": b, "replay_ms": replay_ms, "eager_ms": eager_ms,
                         "traced_every_token_ms": traced_ms, "replay_over_traced": replay_ms / traced_ms,
                         "checks": checks, "passed": all(c["passed"] for c in checks)})
    return out_rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny geometry, two token counts, CPU: no capture (smoke)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--tokens", default=None, help="comma-separated tokens per step (default 64,256,512)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per request in a step (default 16; --quick 4)")
    p.add_argument("--concepts", type=int, default=64, help="distinct concepts in the slot table (default 64)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.seq_len is None:
        args.seq_len = 4 if args.quick else 16
    try:
        tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(QUICK_TOKENS if args.quick else TOKENS)
    except ValueError:
        p.error(f"--tokens {args.tokens!r}: expected comma-separated integers")
    if args.seq_len < 1 or args.concepts < 1:
        p.error(f"--seq-len {args.seq_len} and --concepts {args.concepts}: each must be >= 1")
    for t in tokens:
        if t < 1 or t % min(args.seq_len, t):
            p.error(f"--tokens {t}: must be >= 1 and a multiple of --seq-len {args.seq_len} (or below it)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mode = "graphs" if device.type == "cuda" else "eager"
    geometries = QUICK_GEOMETRIES if args.quick else {"gemma-2-2b": GEOMETRIES["gemma-2-2b"]}
    smallest = QUICK_SMALLEST if args.quick else None
    warmup, reps = (1, 2) if args.quick else (3, 10)
    dtype = torch.float32 if args.quick else torch.bfloat16
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({device_name}), {dtype}, mode {mode} (cpu: replay = an eager call), flow: "
          f"{FLOW.num_blocks} block, {FLOW.n_steps} steps, {args.concepts} concepts, requests of {args.seq_len} tokens")
    print(f"{'geometry':<12} {'tokens':>6} {'bucket':>6} {'replay ms':>10} {'eager ms':>9} {'traced ms':>10} "
          f"{'/traced':>8} {'checks':>8}")
    rows = []
    for name, (g, layers) in geometries.items():
        case = build(name, g, layers, device, dtype, args.concepts)
        state = attach_step_state(case, max(tokens))
        state.graph_rows_wanted = True  # stage the graph row order, as a bucketed engine does
        for n in tokens:
            for row in measure(case, state, n, args.seq_len, args.concepts, mode, smallest, warmup, reps, seed=n):
                row["geometry"] = name
                rows.append(row)
                if "capture_error" in row:
                    print(f"{name:<12} {n:>6} {row['bucket']:>6} capture failed: {row['capture_error']}", flush=True)
                    continue
                print(f"{name:<12} {n:>6} {row['bucket']:>6} {row['replay_ms']:>10.3f} {row['eager_ms']:>9.3f} "
                      f"{row['traced_every_token_ms']:>10.3f} {row['replay_over_traced']:>8.3f} "
                      f"{'pass' if row['passed'] else 'FAIL':>8}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(device), "device_name": device_name, "dtype": str(dtype), "mode": mode,
                       "rows": rows}, fh, indent=2)
    if not rows or not all(r["passed"] for r in rows):
        print("FAILED: a capture failed, a replay differs from the same step run eagerly, or the flow left the "
              "steered tokens as they were", file=sys.stderr)
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
