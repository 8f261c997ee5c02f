"""Regenerates the estimated numbers the docs show, between ``<!-- generated: NAME -->`` and
``<!-- end generated -->`` markers, from the code that computes them.

    python tools/doc_tables.py            # exit 1 and name every block that drifted
    python tools/doc_tables.py --write    # rewrite the blocks in place

``tests/test_doc_tables.py`` runs the check, so a change to the memory estimate, the schedule or a recipe
that moves a documented number fails until the docs are regenerated. Blocks:
``cluster-7b-dry-run`` (the 7B recipe's dry-run excerpt), ``cluster-7b-layouts`` (the layouts table),
``data-sample-steps`` (the sample mixture's step count), ``data-scale-projection`` (prepare-data wall time at
cluster scale from the measured per-core rates), ``data-scale-measured``, ``eval-size-sweep``,
``eval-mqar-sweep``, ``families-throughput`` and ``families-windows`` (recorded measurements, so that the doc and
its source file cannot part; the windows table adds the KV cache the dry run computes).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

from hybrid_megatron.devtools import REPO_ROOT

RECIPE = "configs/pretrain_7b.yaml"
TP1 = ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false"]
# (layout as the table shows it, overrides, GPUs, note after the verdict)
LAYOUTS = [
    ("TP 2, SP, PP 1, micro-batch 1, selective (the recipe)", [], 8, ""),
    ("the recipe at 4 nodes (`--gpus 32`, DP 16)", [], 32, ""),
    ("TP 2, micro-batch 2", ["train.micro_batch_size=2"], 8, ""),
    ("TP 1, PP 1", TP1, 8, ""),
    ("TP 1, PP 1, full recompute", [*TP1, "train.recompute=full"], 8,
     "weights, FP8 copies, fp32 grads and Adam shards alone do not leave room"),
    ("TP 1, PP 4", [*TP1, "parallel.pipeline_model_parallel_size=4"], 8,
     "but the last stage also runs the 131k-vocab head (~30% more FLOPs than the others)"),
    ("TP 1, PP 1, no distributed optimizer", [*TP1, "parallel.use_distributed_optimizer=false",
                                              "parallel.overlap_param_gather=false"], 8, ""),
]


def _dry_run(overrides: list[str], gpus: int) -> list[str]:
    from hybrid_megatron.config import load_run_config
    from hybrid_megatron.training.dry_run import describe

    return describe(load_run_config(REPO_ROOT / RECIPE, overrides), world_size=gpus).splitlines()


def cluster_7b_dry_run() -> str:
    lines = _dry_run([], 8)
    keep = [ln for ln in lines if ln.startswith(("parameters:", "FLOPs per token", "run:"))]
    memory = lines[lines.index("# memory per GPU (estimate)"):]
    memory = [ln for ln in memory if ln and not ln.startswith("# notes")]
    memory = memory[:next(i for i, ln in enumerate(memory) if ln.startswith("activations by layer")) + 1]
    return "```\n$ hybrid-megatron pretrain configs/pretrain_7b.yaml --dry-run\n" + "\n".join(keep + memory) + "\n```"


def cluster_7b_layouts() -> str:
    from hybrid_megatron.model.memory import GB, GPU_BYTES

    rows = ["| layout (overrides of the recipe) | total per GPU | verdict |", "| --- | --- | --- |"]
    for name, overrides, gpus, note in LAYOUTS:
        worst = next(ln for ln in _dry_run(overrides, gpus) if ln.startswith("worst: "))
        stage, total = re.match(r"worst: pp stage (\d+), total ([\d.]+) GB", worst).groups()
        margin = GPU_BYTES / GB - float(total)
        verdict = f"fits, {margin:.1f} GB to spare" if margin >= 0 else f"does not fit ({-margin:.1f} GB over)"
        where = f" (stage {stage})" if stage != "0" else ""
        rows.append(f"| {name} | {total} GB{where} | {verdict}{': ' + note if note else ''} |")
    return "\n".join(rows)


def data_sample_steps() -> str:
    from data_pipeline.config import load_data_config
    from data_pipeline.schedule import build_schedule

    sch = build_schedule(load_data_config(REPO_ROOT / "configs" / "data" / "sample.yaml"))
    return f"{sch.total_steps} steps ({sch.total_tokens:,} tokens)"


def data_scale_projection() -> str:
    """Wall time to prepare 20T tokens from the measured per-worker rates (benchmarks/results/prepare_throughput.json)."""
    import json

    measured = json.loads((REPO_ROOT / "benchmarks" / "results" / "prepare_throughput.json").read_text())
    workers = measured["config"]["workers"]
    rows = ["| tokenizer | tokens/s per core (measured) | 1 node | 8 nodes | 32 nodes | 128 nodes |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in measured["results"]:
        per_core = r["tokens_per_s"] / workers
        hours = [20e12 / (per_core * 64 * nodes) / 3600 for nodes in (1, 8, 32, 128)]
        rows.append(f"| {r['tokenizer']} | {per_core / 1e6:.2f}M | " + " | ".join(
            f"{h / 24:.1f} days" if h >= 48 else f"{h:.1f} h" for h in hours) + " |")
    return "\n".join(rows)


def data_scale_measured() -> str:
    """Loader tokens/s from a loopback HTTP server and local disk, prepare-data with 1 and 2 tasks
    (benchmarks/results/data_scale_cpu.json)."""
    import json

    m = json.loads((REPO_ROOT / "benchmarks" / "results" / "data_scale_cpu.json").read_text())
    target = m["loader_target_tokens_per_s"]
    rows = ["| case | tokens/s | note |", "| --- | --- | --- |"]
    for name, label in (("local", "loader, seq 4096, local disk"), ("http_loopback", "loader, seq 4096, HTTP (127.0.0.1)")):
        r = m["loader"][name]
        rows.append(f"| {label} | {r['tokens_per_s'] / 1e6:.1f}M | {r['tokens_per_s'] / target:.0f}x the 15x-H200 target |")
    for name, r in m["prepare"].items():
        rows.append(f"| prepare-data, bytes, {name.replace('_', ' ')} | {r['tokens_per_s'] / 1e6:.2f}M | "
                    f"{r['tokens'] / 1e6:.1f}M tokens in {r['seconds']:.1f} s |")
    return "\n".join(rows)


def eval_size_sweep() -> str:
    """The tiny hybrid at four widths on the same tokens: parameters, validation loss, loss past the training
    length, the local lm-eval tasks, and the L(N) fit (benchmarks/results/size_sweep_h200/size_sweep.json)."""
    import json

    m = json.loads((REPO_ROOT / "benchmarks" / "results" / "size_sweep_h200" / "size_sweep.json").read_text())
    rows = ["| hidden | parameters | validation loss | loss at positions 1024-8191 (8x windows) | python_next_line acc "
            "| python_bpb bits/byte |", "| --- | --- | --- | --- | --- | --- |"]
    for run, summary in zip(m["runs"], m["compare"]["runs"]):
        suites = run["eval"]["suites"]
        past = suites["length"]["by_length"]["8x"]["beyond_train_len"]
        tasks = suites.get("lm-eval", {}).get("tasks")
        lm = (f"{tasks['python_next_line']['acc']:.3f} | {tasks['python_bpb']['bits_per_byte']:.3f}" if tasks
              else "not run (see below) | -")
        rows.append(f"| {run['hidden']} | {summary['params'] / 1e6:.1f}M | {suites['ppl']['loss']:.4f} | "
                    f"{past['loss']:.4f} | {lm} |")
    # the law and its backtest computed here from the recorded runs, by compare's own code
    from hybrid_megatron.eval import size_fits

    points = [size_fits.Point(r["name"], r["params"], r["final_val_loss"], r["final_train_loss"], r["tokens"],
                              run["hidden"], r["params"]) for run, r in zip(m["runs"], m["compare"]["runs"])]
    [family] = size_fits.fit_families({"tiny": points})
    fit = family.summary()["scaling_fit"]
    low, high = fit["alpha_ci"]
    test = fit["backtest"]
    rows += ["", f"L(N) = {fit['E']:.3f} + {fit['A']:.3g} N^-{fit['alpha']:.2f}, alpha's 95% bootstrap interval "
             f"{low:.2f}-{high:.2f} ({fit['runs']} runs, {m['compare']['runs'][0]['tokens'] / 1e6:.1f}M tokens each). "
             f"Backtest: fitted to the three smaller sizes, the law predicts {test['predicted']:.4f} for the "
             f"{test['held_out'] / 1e6:.1f}M model ({test['extrapolation']:.1f}x the next), which measured "
             f"{test['actual']:.4f} ({test['error']:+.1%})."]
    return "\n".join(rows)


def _cut(cell: dict, name: str) -> str:
    from hybrid_megatron.eval.report import cut_p_value

    cut = cell[name]
    if isinstance(cut, str):
        return "-"
    return f"{cell['accuracy'][name]:.3f} ({cut['reliance']:.2f}, p {cut_p_value(cut)})"


def eval_mqar_sweep() -> str:
    """MQAR accuracy by key-value pairs for the three matched models, and the state suite's cuts with reliance
    and McNemar p-values (benchmarks/results/mqar_sweep_h200/mqar_sweep.json)."""
    import json

    m = json.loads((REPO_ROOT / "benchmarks" / "results" / "mqar_sweep_h200" / "mqar_sweep.json").read_text())
    pairs = sorted({int(p) for r in m["runs"].values() for p in r["mqar_accuracy_by_pairs"]})
    rows = ["| model | step | validation loss | " + " | ".join(f"{p} pairs" for p in pairs) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in pairs) + " |"]
    for name, r in m["runs"].items():
        loss = r["validation_loss_by_step"][str(r["evaluated_step"])]
        rows.append(f"| {name} ({r['params'] / 1e6:.2f}M) | {r['evaluated_step']} | {loss:.3f} | "
                    + " | ".join(f"{r['mqar_accuracy_by_pairs'][str(p)]:.3f}" for p in pairs) + " |")
    rows += ["", "| model, pairs | full | SSM cut (reliance, p) | attention cut (reliance, p) | answers |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in m["runs"].items():
        for cell in r["state"]:
            rows.append(f"| {name}, {cell['pairs']} | {cell['accuracy']['full']:.3f} | {_cut(cell, 'ssm_cut')} | "
                        f"{_cut(cell, 'attention_cut')} | {cell['answers']} |")
    return "\n".join(rows)


FAMILIES = "benchmarks/results/families_throughput_h200"
# (what the row shows, result file, model): each file holds one process's cases, in the order they ran
FAMILY_ROWS = [
    ("Gated DeltaNet hybrid", "gdn_hybrid_4k.json", "gdn1b"),
    ("Mamba-2 hybrid", "gdn_hybrid_4k.json", "hybrid1b"),
    ("Mamba-2 hybrid", "moe_attn_hybrid_4k.json", "hybrid1b"),
    ("attention only", "moe_attn_hybrid_4k.json", "attn1b"),
    ("MoE hybrid", "moe_attn_hybrid_4k.json", "moe1b"),
    ("Gated DeltaNet hybrid", "gdn_16k_stock_first.json", "gdn1b"),
    ("Mamba-2 hybrid", "hybrid_16k.json", "hybrid1b"),
    ("attention only", "attn_16k.json", "attn1b"),
]


def _result(name: str) -> dict:
    import json

    return json.loads((REPO_ROOT / FAMILIES / name).read_text())


def _case(result: dict, name: str) -> tuple[int, dict]:
    """(1-based position in the process, the case's first run)."""
    rows = [c for c in result["cases"] if c["repeat"] == 0]
    i = next(i for i, c in enumerate(rows) if c["name"] == name)
    return i + 1, rows[i]


def _ran(result: dict) -> int:
    return sum(1 for c in result["cases"] if c["repeat"] == 0 and "error" not in c)


def families_throughput() -> str:
    """Ours against stock megatron-core for each layer family, bf16, one H200 (benchmarks/results/
    families_throughput_h200/)."""
    from hybrid_megatron.devtools.bench import MODELS, run_config
    from hybrid_megatron.model.flops import active_parameters

    rows = ["| model | params (active) | seq | ours tok/s | stock tok/s | ours / stock | cases in the process | source |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for what, name, model in FAMILY_ROWS:
        result = _result(name)
        (i, ours), (j, stock) = _case(result, f"{model}-bf16-ours"), _case(result, f"{model}-bf16-stock")
        pattern = MODELS[model]["hybrid_layer_pattern"]
        active = active_parameters(run_config(model, "bf16", ours["seq_len"], 1, 1).model, ours["padded_vocab"])
        size = f"{ours['params'] / 1e9:.2f}B" + (f" ({active / 1e9:.2f}B)" if active != ours["params"] else "")
        unit = next(pattern[:n] for n in range(1, len(pattern) + 1) if pattern == pattern[:n] * (len(pattern) // n))
        rows.append(f"| {what} (`{unit}` x{len(pattern) // len(unit)}) | {size} | "
                    f"{ours['seq_len']} | {ours['tokens_per_s']:,.0f} | {stock['tokens_per_s']:,.0f} | "
                    f"{ours['tokens_per_s'] / stock['tokens_per_s']:.3f} | {i} and {j} of {_ran(result)} | `{name}` |")
    return "\n".join(rows)


def families_windows() -> str:
    """The windowed hybrid against its full-attention twin: training tokens/s (measured) and the inference KV cache
    (computed, as the dry run prints it)."""
    from hybrid_megatron.devtools.bench import run_config
    from hybrid_megatron.model.inference_cache import cache_bytes

    rows = ["| seq | windowed tok/s | full tok/s | windowed / full | KV cache, windowed | KV cache, full | source |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("windows_16k.json", "windows_32k.json"):
        result = _result(name)
        (_, win), (_, full) = _case(result, "swa1b-bf16-ours"), _case(result, "swafull1b-bf16-ours")
        seq = win["seq_len"]
        cache = [cache_bytes(run_config(m, "bf16", seq, 1, 1).model, seq).attention / 2**30 for m in ("swa1b", "swafull1b")]
        rows.append(f"| {seq} | {win['tokens_per_s']:,.0f} | {full['tokens_per_s']:,.0f} | "
                    f"{win['tokens_per_s'] / full['tokens_per_s']:.3f} | {cache[0]:.2f} GiB | {cache[1]:.2f} GiB | `{name}` |")
    return "\n".join(rows)


BLOCKS: dict[str, tuple[str, Callable[[], str]]] = {
    "cluster-7b-dry-run": ("docs/cluster.md", cluster_7b_dry_run),
    "cluster-7b-layouts": ("docs/cluster.md", cluster_7b_layouts),
    "data-sample-steps": ("docs/data.md", data_sample_steps),
    "data-scale-projection": ("docs/data.md", data_scale_projection),
    "data-scale-measured": ("docs/data.md", data_scale_measured),
    "eval-size-sweep": ("README.md", eval_size_sweep),
    "eval-mqar-sweep": ("README.md", eval_mqar_sweep),
    "families-throughput": ("README.md", families_throughput),
    "families-windows": ("README.md", families_windows),
}


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- generated: {re.escape(name)} -->)(.*?)(<!-- end generated -->)", re.S)


def render(text: str, name: str, body: str) -> str:
    """``text`` with block ``name`` replaced by ``body`` (a block inside a line stays inline)."""
    pattern = _pattern(name)
    match = pattern.search(text)
    if match is None:
        raise ValueError(f"no '<!-- generated: {name} -->' block")
    inline = "\n" not in match.group(2)
    new = body if inline else f"\n{body}\n"
    return text[: match.start(2)] + new + text[match.end(2):]


def drifted() -> list[str]:
    """Names of the blocks whose text differs from what the code computes now."""
    out = []
    for name, (doc, make) in BLOCKS.items():
        text = (REPO_ROOT / doc).read_text()
        if render(text, name, make()) != text:
            out.append(f"{doc}: {name}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="rewrite the blocks in place")
    args = ap.parse_args(argv)
    if args.write:
        for name, (doc, make) in BLOCKS.items():
            path = REPO_ROOT / doc
            path.write_text(render(path.read_text(), name, make()))
        return 0
    stale = drifted()
    for line in stale:
        print(f"stale: {line} (python tools/doc_tables.py --write)")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
