"""The report: environment, markdown table, PNG plot, summary lines."""

from __future__ import annotations


import json
import os
import platform
import time
from pathlib import Path

from flas_vllm import __version__
from flas_vllm.bench.config import BenchConfig, bench_stem
from flas_vllm.bench.runners import usable_cpu_count


# ---------------------------------------------------------------------------
# report


def run_environment(cfg: BenchConfig) -> dict:
    import torch  # lazy: torch is heavy

    env = {"flas_vllm": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "machine": platform.machine(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "torch_threads": torch.get_num_threads(), "compile": not cfg.enforce_eager,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    env["cpus"] = usable_cpu_count()
    for mod in ("vllm", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # pragma: no cover
            env[mod] = f"not importable ({exc})"
    try:
        env["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        pass
    return env


def _fmt(x, nd=1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}"


def _graph_path_label(cfg: dict) -> str:
    """Every output of a --graph-path or bucketed run says so: its numbers are not the default (skip) path's."""
    bucketed = cfg.get("flow_graphs") == "bucketed"
    if cfg.get("graph_path"):
        return ", FLAS on the forced bucketed graph path" if bucketed else ", FLAS on the forced graph path"
    return ", FLAS with bucketed FULL graphs" if bucketed else ""


def _pct(p: dict | None) -> str:
    if not p:
        return "n/a"
    return " / ".join(_fmt(p[k], 1) for k in ("p50", "p90", "p99"))


def render_markdown(report: dict) -> str:
    cfg, runs = report["config"], report["runs"]
    lines = [f"# flas-vllm benchmark: `{cfg['model']}`{_graph_path_label(cfg)}", ""]
    env = report["environment"]
    lines.append(
        f"{cfg['num_prompts']} prompts ({report['workload']['mean_prompt_tokens']:.1f} prompt tokens on average), "
        f"{cfg['output_len']} output tokens each (greedy, ignore_eos), dtype {cfg['dtype']}, "
        f"{'compiled' if not cfg['enforce_eager'] else 'eager'}; vLLM {env.get('vllm')}, torch {env.get('torch')}, "
        f"{env.get('cuda') or str(env.get('cpus')) + ' CPU cores'}; {env.get('time')}."
    )
    lines += ["", "TTFT and TPOT in ms as p50 / p90 / p99. TTFT counts from the start of the offline batch "
              "(every request arrives at once), so it includes queueing.", ""]
    lines.append("| run | K | concepts | requests | wall s | output tok/s | total tok/s | x vanilla (output) "
                 "| x vanilla (total) | TTFT ms | TPOT ms | encode s |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for r in runs:
        name = r["name"] + (f" (= K={r['reused_from_k']})" if r.get("reused_from_k") else "")
        lines.append(
            f"| {name} | {_fmt(r['k']) if r['k'] else '-'} | {r['concepts_used']} | {r['num_requests']} "
            f"| {_fmt(r['wall_s'], 2)} | {_fmt(r['output_tok_s'])} | {_fmt(r['total_tok_s'])} "
            f"| {_fmt(r['ratio_output_to_vanilla'], 3)} | {_fmt(r['ratio_total_to_vanilla'], 3)} "
            f"| {_pct(r['ttft_ms'])} | {_pct(r['tpot_ms'])} | {_fmt(r['encode_s'], 3)} |"
        )
    lines += _mixed_section(runs) + _rounds_section(report)
    fl = report["flops"]
    a, w, ref = fl["at_mean_context"], fl["weights_only"], fl["reference_gemma_2_2b_dims"]
    lines += [
        "",
        "## Throughput ceiling implied by FLOPs",
        "",
        f"Flow: layer {fl['flas']['layer']}, {fl['flas']['num_blocks']} block(s), {fl['flas']['n_steps']} Euler "
        f"steps, cross-attention over {fl['flas']['concept_max_len']} concept slots. {fl['note']}.",
        "",
        "| model | context | base MFLOP/token | flow MFLOP/token | flow / base | ceiling base/(base+flow) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, c in (("this model", a), ("this model", w), ("Gemma-2-2B dims (analytic)", ref)):
        lines.append(f"| {label} | {c['context_tokens']} | {c['base_flops_per_token'] / 1e6:,.2f} "
                     f"| {c['flow_flops_per_token'] / 1e6:,.2f} | {c['flow_over_base']:.3f} "
                     f"| {c['throughput_ceiling']:.3f} |")
    kv = report["kv_capacity"]
    lines += ["", "## KV cache capacity (same kv_cache_memory_bytes)", "",
              "| engine | blocks x block_size (tokens) | vLLM KV cache size (tokens, group-aware) "
              "| flas / vanilla (blocks; group-aware) |",
              "|---|---:|---:|---:|"]
    ratios = kv.get("ratio_flas_to_vanilla") or {}
    for label, key in (("vanilla vLLM", "vanilla"), ("flas-vllm", "flas")):
        e = kv.get(key) or {}
        if key == "vanilla":
            ratio = "1"
        else:
            ratio = " / ".join(_fmt(ratios[k], 3) for k in ("blocks_x_block_size_tokens", "group_aware_tokens")
                               if k in ratios) or "n/a"
        lines.append(f"| {label} | {_fmt(e.get('blocks_x_block_size_tokens'))} "
                     f"| {_fmt(e.get('group_aware_tokens'))} | {ratio} |")
    enc = report["concept_encoding"]
    lines += ["", "## Encoding a new concept", ""]
    if enc.get("engine_mean_encode_ms") is not None:
        lines.append(f"- flas-vllm engine counters: {enc['engine_encoded']} concepts encoded in "
                     f"{enc['engine_encode_seconds']:.3f} s, {enc['engine_mean_encode_ms']:.2f} ms each "
                     "(inside the engine step, blocks it)")
    if enc.get("preload_one_concept_ms"):
        lines.append(f"- `FlasLLM.preload_concepts([c])` of a fresh concept (RPC included): "
                     f"{_pct(enc['preload_one_concept_ms'])} ms (p50 / p90 / p99)")
    if enc.get("preload_batch"):
        pb = enc["preload_batch"]
        lines.append(f"- `preload_concepts` of {pb['concepts']} fresh concepts at once: {pb['seconds']:.3f} s "
                     f"({pb['per_concept_ms']:.2f} ms per concept)")
    if enc.get("hf_encode_one_concept_ms"):
        lines.append(f"- transformers path, one fresh concept: {_pct(enc['hf_encode_one_concept_ms'])} ms")
    if report.get("not_measured"):
        lines += ["", "## Not measured", ""] + [f"- {x}" for x in report["not_measured"]]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {x}" for x in report["notes"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> str | None:
    """Output tokens/s vs K. Returns None when done, else why not."""
    try:
        import matplotlib  # optional: matplotlib (bench extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional: matplotlib (bench extra)
        import matplotlib.ticker  # optional: matplotlib (bench extra)
    except ImportError:
        return "matplotlib is not installed (pip install 'flas-vllm[bench]'): no PNG plot"
    runs = report["runs"]
    van = next(r for r in runs if r["kind"] == "vanilla")
    uns = next((r for r in runs if r["kind"] == "flas-unsteered"), None)
    steered = [r for r in runs if r["kind"] == "flas-steered"]
    hf = [r for r in runs if r["kind"] == "hf"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(van["output_tok_s"], color="black", ls="-", lw=1.2, label="vanilla vLLM")
    ceiling = report["flops"]["at_mean_context"]["throughput_ceiling"]
    ax.axhline(van["output_tok_s"] * ceiling, color="gray", ls=":", lw=1.2,
               label=f"FLOPs ceiling ({ceiling:.2f} x vanilla)")
    equal = next((r for r in runs if r["kind"] == "vanilla-equal-kv"), None)
    if equal:
        ax.axhline(equal["output_tok_s"], color="black", ls="--", lw=1.0, label="vanilla vLLM, flas-vllm's KV capacity")
    if uns:
        ax.axhline(uns["output_tok_s"], color="tab:green", ls="--", lw=1.2, label="flas-vllm, unsteered")
    if steered:
        ax.plot([r["k"] for r in steered], [r["output_tok_s"] for r in steered], "o-", color="tab:blue",
                label="flas-vllm, K concepts")
    if hf:
        ax.plot([r["k"] for r in hf], [r["output_tok_s"] for r in hf], "s-", color="tab:red",
                label="transformers path (1 concept / batch)")
    ax.set_xscale("log", base=2)
    ks = sorted({r["k"] for r in steered + hf})
    if ks:
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("K distinct concepts in the batch")
    ax.set_ylabel("output tokens / s")
    cfg = report["config"]
    ax.set_title(f"{cfg['model']}{_graph_path_label(cfg)}: {cfg['num_prompts']} prompts x {cfg['output_len']} tokens")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _mixed_section(runs: list[dict]) -> list[str]:
    mixed = [r for r in runs if r["kind"] == "flas-mixed"]
    if not mixed:
        return []
    van = next(r for r in runs if r["kind"] == "vanilla")
    lines = ["", "## Mixed traffic", "",
             "Some requests steered, the rest not, in one batch. The unsteered requests' decode speed is "
             f"vanilla's TPOT p50 ({_fmt((van['tpot_ms'] or {}).get('p50'), 3)} ms) over theirs, and the FLAS "
             "engine's all-unsteered run's TPOT p50 over theirs (same engine and KV capacity, so the same "
             "concurrency: only the steered neighbours differ; vanilla's larger KV cache runs more requests "
             "at once, each at a higher TPOT), and, where it ran, vanilla vLLM's at the FLAS engine's KV "
             "capacity over theirs (the same concurrency, vanilla's engine: like for like).", "",
             "| run | steered requests | output tok/s | x vanilla (output) | unsteered TPOT ms "
             "| unsteered speed x vanilla | x unsteered run | x vanilla at flas-vllm's KV capacity |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in mixed:
        lines.append(f"| {r['name']} | {r['steered_requests']} of {r['num_requests']} | {_fmt(r['output_tok_s'])} "
                     f"| {_fmt(r['ratio_output_to_vanilla'], 3)} | {_pct(r['unsteered_tpot_ms'])} "
                     f"| {_fmt(r['ratio_unsteered_speed_to_vanilla'], 3)} "
                     f"| {_fmt(r.get('ratio_unsteered_speed_to_unsteered_run'), 3)} "
                     f"| {_fmt(r.get('ratio_unsteered_speed_to_vanilla_at_flas_kv'), 3)} |")
    return lines


def _rounds_section(report: dict) -> list[str]:
    """Each round's x vanilla (output tokens/s), run by run: the spread the medians above come from."""
    rounds = report.get("rounds")
    if not rounds:
        return []
    lines = ["", "## Rounds", "", f"The vLLM engines ran {len(rounds)} times, one round after another; the "
             "ratios above are the medians of these (x each round's own vanilla, output tokens/s).", "",
             "| run | " + " | ".join(r["time"] for r in rounds) + " |", "|---|" + "---:|" * len(rounds)]
    for name in rounds[0]["runs"]:
        lines.append(f"| {name} | " + " | ".join(_fmt(r["runs"][name]["ratio_output_to_vanilla"], 3)
                                               for r in rounds) + " |")
    return lines


def summary_lines(report: dict) -> list[str]:
    out = [f"ratios to vanilla vLLM ({report['config']['model']}{_graph_path_label(report['config'])}, "
           "output tokens/s; total tokens/s):"]
    for r in report["runs"]:
        if r["kind"] == "vanilla":
            out.append(f"  {r['name']:<28} {r['output_tok_s']:>10.1f} tok/s  (reference)")
            continue
        out.append(f"  {r['name']:<28} {r['output_tok_s']:>10.1f} tok/s  x{r['ratio_output_to_vanilla']:.3f}"
                   f"  (total x{r['ratio_total_to_vanilla']:.3f})")
        if r.get("ratio_unsteered_speed_to_vanilla") is not None:
            own = r.get("ratio_unsteered_speed_to_unsteered_run")
            equal = r.get("ratio_unsteered_speed_to_vanilla_at_flas_kv")
            out.append(f"  {'':<28} unsteered requests' decode speed x{r['ratio_unsteered_speed_to_vanilla']:.3f}"
                       + ("" if own is None else f" (x{own:.3f} the all-unsteered run's)")
                       + ("" if equal is None else f" (x{equal:.3f} vanilla's at the same KV capacity)"))
    if report.get("rounds"):
        out.append(f"  medians of {len(report['rounds'])} rounds; x vanilla in each round:")
        for name in report["rounds"][0]["runs"]:
            ratios = " / ".join(f"{r['runs'][name]['ratio_output_to_vanilla']:.3f}" for r in report["rounds"])
            out.append(f"  {name:<28} {ratios}")
    fl = report["flops"]["at_mean_context"]
    out.append(f"  FLOPs ceiling (all tokens through the flow): x{fl['throughput_ceiling']:.3f}")
    kv = report["kv_capacity"].get("ratio_flas_to_vanilla") or {}
    if kv:
        k = "group_aware_tokens" if "group_aware_tokens" in kv else "blocks_x_block_size_tokens"
        out.append(f"  KV capacity, flas / vanilla ({k}): x{kv[k]:.3f}")
    equal = report["kv_capacity"].get("unsteered_x_vanilla_at_flas_kv")
    if equal is not None:
        out.append(f"  flas-vllm unsteered x vanilla at the same KV capacity: x{equal:.3f}")
    return out




README_BEGIN = "<!-- bench-table: generated by `python benchmarks/readme_table.py` from benchmarks/results -->"
README_END = "<!-- /bench-table -->"


def readme_table(report: dict, graph_report: dict | None = None, bucketed_report: dict | None = None) -> str:
    """The README's performance table, made from a report (never copied by hand); a --graph-path report of
    the same model adds a short second table, a bucketed --graph-path report a third, so the forced graph
    paths' numbers are never mistaken for these."""
    cfg = report["config"]
    if cfg.get("graph_path") or cfg.get("flow_graphs", "traced") != "traced":  # the main table is the default run's
        raise ValueError("that is a --graph-path or bucketed report: pass the default run's JSON (it is found next to it)")
    ceiling = report["flops"]["at_mean_context"]["throughput_ceiling"]
    kv = report["kv_capacity"]["ratio_flas_to_vanilla"].get("group_aware_tokens")
    tail = f"FLOPs ceiling {ceiling:.3f}" + (f"; KV capacity with the flow's paged layers {kv:.2f} of vanilla's" if kv else "")
    equal = report["kv_capacity"].get("unsteered_x_vanilla_at_flas_kv")
    if equal is not None:
        tail += f"; flas-vllm unsteered x vanilla at the same KV capacity {equal:.3f}"
    lines = [README_BEGIN, "", _readme_head(report), "", *_readme_rows(report), "", tail + ".", ""]
    extra = ((graph_report, "**Forced graph path** (`flas-vllm bench --graph-path`): the flow runs on every token and "
                            "`torch.where` keeps unsteered ones untouched, as in a captured CUDA graph"),
             (bucketed_report, "**Forced bucketed graph path** (`flas-vllm bench --graph-path --flow-graphs bucketed`): "
                               "each step runs the flow on its steered tokens rounded up to the bucket, graph-safe, "
                               "as a FULL CUDA graph keyed by the steered bucket would"))
    for other, title in extra:
        if other is None:
            continue
        if other["config"]["model"] != cfg["model"]:
            raise ValueError(f"graph-path report is for {other['config']['model']!r}, not {cfg['model']!r}")
        lines += [f"{title}; ratios to that run's own vanilla. {_readme_head(other)}", "",
                  *_readme_rows(other, kinds=("flas-steered",)), ""]
    return "\n".join([*lines, README_END])


def _readme_head(report: dict) -> str:
    cfg, env = report["config"], report["environment"]
    return (f"`{report['model']['name']}`, {report['workload']['num_prompts']} prompts x "
            f"{report['workload']['output_len']} tokens, {cfg['dtype']}, {'compiled' if env.get('compile') else 'eager'}; "
            f"{env.get('machine', '')} {env.get('cpus', '')} CPUs, vLLM {env.get('vllm', '')}, "
            + (f"engine {env['engine_process']}, " if env.get("engine_process") else "") + f"{env.get('time', '')}"
            + (f"; medians of {len(report['rounds'])} rounds" if report.get("rounds") else ""))


def _readme_rows(report: dict, kinds=("flas-steered", "hf")) -> list[str]:
    """Table rows: vanilla, unsteered, one row per kind in `kinds` (all its Ks), the mixed runs."""
    by_kind: dict[str, list[dict]] = {}
    for r in report["runs"]:
        by_kind.setdefault(r["kind"], []).append(r)
    rows = ["| run | output tok/s | x vanilla |", "|---|---:|---:|"]
    for r in by_kind.get("vanilla", []) + by_kind.get("vanilla-equal-kv", []) + by_kind.get("flas-unsteered", []):
        rows.append(f"| {r['name']} | {r['output_tok_s']:.1f} | {r['ratio_output_to_vanilla']:.3f} |")
    for kind in kinds:
        rs = [r for r in by_kind.get(kind, []) if "(=" not in r["name"]]
        if rs:
            ks = " / ".join(str(r["k"]) for r in rs)
            tok = " / ".join(f"{r['output_tok_s']:.0f}" for r in rs)
            ratio = " / ".join(f"{r['ratio_output_to_vanilla']:.2f}" for r in rs)
            rows.append(f"| {_KIND_LABELS[kind]}, K = {ks} | {tok} | {ratio} |")
    mixed = by_kind.get("flas-mixed", [])
    if mixed:  # reports from before the mixed-traffic runs have none: their table is unchanged
        pct = " / ".join(f"{r['steered_requests'] / r['num_requests']:.0%}" for r in mixed)
        tok = " / ".join(f"{r['output_tok_s']:.0f}" for r in mixed)
        ratio = " / ".join(f"{r['ratio_output_to_vanilla']:.2f}" for r in mixed)
        rows.append(f"| flas-vllm mixed, {pct} steered | {tok} | {ratio} |")
        if all(r.get("ratio_unsteered_speed_to_vanilla") for r in mixed):
            speed = " / ".join(f"{r['ratio_unsteered_speed_to_vanilla']:.2f}" for r in mixed)
            rows.append(f"| unsteered requests in them (decode speed, TPOT p50) | | {speed} |")
        if all(r.get("ratio_unsteered_speed_to_unsteered_run") for r in mixed):
            speed = " / ".join(f"{r['ratio_unsteered_speed_to_unsteered_run']:.2f}" for r in mixed)
            rows.append(f"| the same, x the all-unsteered flas-vllm run (same KV capacity) | | {speed} |")
        if all(r.get("ratio_unsteered_speed_to_vanilla_at_flas_kv") for r in mixed):
            speed = " / ".join(f"{r['ratio_unsteered_speed_to_vanilla_at_flas_kv']:.2f}" for r in mixed)
            rows.append(f"| the same, x vanilla vLLM at flas-vllm's KV capacity | | {speed} |")
    return rows


_KIND_LABELS = {"flas-steered": "flas-vllm", "hf": "transformers path"}


def readme_table_from(path: Path) -> str:
    """readme_table() of a default run's JSON, with the same model's --graph-path JSONs (traced, bucketed) when
    they lie next to it."""
    report = json.loads(path.read_text())
    found = [path.with_name(bench_stem(report["config"]["model"], True, flow_graphs) + ".json")
             for flow_graphs in ("traced", "bucketed")]
    return readme_table(report, *(json.loads(p.read_text()) if p.exists() else None for p in found))


def replace_readme_table(readme: str, table: str) -> str:
    start, end = readme.index(README_BEGIN), readme.index(README_END) + len(README_END)
    return readme[:start] + table + readme[end:]
