"""What ``eval`` writes: ``results.json``, ``report.md`` and PNG plots (matplotlib, Agg), and the headline
numbers ``compare`` puts side by side. Pure functions of the results dict: they run on a CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hybrid_megatron.eval import plots, positions

RESULTS = "results.json"
REPORT = "report.md"


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plotters = {"ppl": _plot_ppl, "length": _plot_length, "lm-eval": _plot_lm_eval, "mqar": _plot_mqar,
                "state": _plot_state, "niah": _plot_niah}  # generation is text: its samples go in the report
    plots = {name: plot(results["suites"][name], out) for name, plot in plotters.items() if name in results["suites"]}
    results = {**results, "plots": plots}
    tmp = out / f".{RESULTS}.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, out / RESULTS)
    (out / REPORT).write_text(markdown(results))


def read(path: Path) -> dict:
    from data_pipeline.errors import DataError

    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable eval results ({exc})") from None
    if not isinstance(results, dict) or not isinstance(results.get("suites"), dict):
        raise DataError(f"{path}: not eval results (no 'suites')")
    return results


def headline(results: dict) -> dict[str, float]:
    """Flat {name: value} of the numbers worth a column: overall and per-source validation loss, loss past
    the training length per window, and every lm-eval metric (without standard errors)."""
    out = {}
    suites = results["suites"]
    if "ppl" in suites:
        out["ppl/loss"] = suites["ppl"]["loss"]
        for name, row in suites["ppl"]["by_source"].items():
            out[f"ppl/loss/{name}"] = row["loss"]
    if "length" in suites:
        for k, row in suites["length"]["by_length"].items():
            out[f"length/{k}/loss"] = row["loss"]
    if "lm-eval" in suites:
        for task, row in suites["lm-eval"]["tasks"].items():
            for metric, value in row.items():
                if not metric.endswith("_stderr") and "_stderr," not in metric:
                    out[f"lm-eval/{task}/{metric}"] = value
    for c in suites.get("mqar", {}).get("cells", []):
        out[f"mqar/{c['seq_len']}/{c['pairs']}/accuracy"] = c["accuracy"]
    for c in suites.get("state", {}).get("cells", []):
        for cond, acc in c["accuracy"].items():
            out[f"state/{c['seq_len']}/{c['pairs']}/{cond}/accuracy"] = acc
        for cut in ("ssm_cut", "attention_cut"):
            if isinstance(c[cut], dict) and c[cut]["reliance"] is not None:
                out[f"state/{c['seq_len']}/{c['pairs']}/{cut}/reliance"] = c[cut]["reliance"]
    niah = suites.get("niah", {}).get("cells", [])
    for k in sorted({c["multiple"] for c in niah}):
        cells = [c for c in niah if c["multiple"] == k]
        out[f"niah/{k}x/accuracy"] = sum(c["accuracy"] for c in cells) / len(cells)
    for t, row in suites.get("generation", {}).get("by_temperature", {}).items():
        for metric in ("distinct_2", "repetition_rate_4", "mean_length"):
            out[f"generation/t{t}/{metric}"] = row[metric]
    return out


def markdown(results: dict) -> str:
    suites = results["suites"]
    lines = [f"# Evaluation of {results['checkpoint']}", "",
             f"Step {results['step']}, {results['params']:,} parameters, pattern `{results['pattern']}`, "
             f"evaluated at TP={results['layout']['tp']} PP={results['layout']['pp']} DP={results['layout']['dp']}.",
             ""]
    if "ppl" in suites:
        s = suites["ppl"]
        lines += ["## Validation loss (`ppl`)", "", f"Windows of {s['seq_len']} tokens.", "",
                  "| source | loss | perplexity | tokens |", "| --- | --- | --- | --- |"]
        for name, row in s["by_source"].items():
            lines.append(f"| {name} | {row['loss']:.4f} | {row['ppl']:.3f} | {row['tokens']:,} |")
        lines += [f"| **all** | **{s['loss']:.4f}** | **{s['ppl']:.3f}** | {s['tokens']:,} |", "",
                  "![validation loss](ppl.png)", ""]
    if "length" in suites:
        s = suites["length"]
        lines += ["## Loss by position (`length`)", "",
                  f"Training length {s['train_len']}; positions in bins of {s['bin_size']} (the position inside "
                  "the document when documents are packed with resets).", "",
                  "| window | loss | tokens | loss past the training length |", "| --- | --- | --- | --- |"]
        for k, row in s["by_length"].items():
            past = row["beyond_train_len"]
            past_text = f"{past['loss']:.4f} ({past['tokens']:,} tokens)" if past else "-"
            lines.append(f"| {k} ({row['window']}) | {row['loss']:.4f} | {row['tokens']:,} | {past_text} |")
        lines += ["", "![loss by position](length.png)", ""]
    if "lm-eval" in suites:
        s = suites["lm-eval"]
        lines += ["## lm-evaluation-harness (`lm-eval`)", "",
                  f"lm-eval {s['lm_eval_version']}, exported model in {s['dtype']} on {s['device']}"
                  + (f", at most {s['limit']} documents per task" if s["limit"] else "") + ".", "",
                  "| task | metric | value | stderr | documents |", "| --- | --- | --- | --- | --- |"]
        for task, row in s["tasks"].items():
            for metric, value in sorted(row.items()):
                if metric.endswith("_stderr"):
                    continue
                err = row.get(f"{metric}_stderr")
                err_text = f"{err:.4f}" if isinstance(err, float) and err == err else "-"
                lines.append(f"| {task} | {metric} | {value:.4f} | {err_text} | {s['samples'].get(task)} |")
        lines += ["", "![lm-eval](lm_eval.png)", ""]
    if "mqar" in suites:
        s = suites["mqar"]
        lines += ["## Multi-query associative recall (`mqar`)", "",
                  f"{s['items_per_cell']} unseen items per cell (seed {s['seed']}); accuracy over answers.", "",
                  "| pairs | length | accuracy | items all right | answers |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {c['pairs']} | {c['seq_len']} | {c['accuracy']:.4f} | {c['items_all_right']:.4f} | {c['answers']:,} |"
                  for c in s["cells"]]
        lines += ["", "![mqar](mqar.png)", ""]
    if "state" in suites:
        lines += _state_markdown(suites["state"])
    if "niah" in suites:
        s = suites["niah"]
        ks = sorted({c["multiple"] for c in s["cells"]})
        depths_ = sorted({c["depth"] for c in s["cells"]})
        acc = {(c["multiple"], c["depth"]): c["accuracy"] for c in s["cells"]}
        lines += ["## Pass-key retrieval (`niah`)", "", f"{s['items_per_cell']} keys per cell; accuracy by depth "
                  f"(rows) and context (columns; training length {s['train_len']}).", "",
                  "| depth | " + " | ".join(f"{k}x" for k in ks) + " |", "| --- |" + " --- |" * len(ks)]
        lines += [f"| {d:.0%} | " + " | ".join(f"{acc[(k, d)]:.2f}" for k in ks) + " |" for d in depths_]
        lines += ["", "![niah](niah.png)", ""]
    if "generation" in suites:
        lines += _generation_markdown(suites["generation"])
    return "\n".join(lines)


def _generation_markdown(s: dict) -> list[str]:
    lines = ["## Generation (`generation`)", "",
             f"{s['prompts']} held-out prompts of {s['prompt_tokens']} tokens.", "",
             "| temperature | distinct-1 | distinct-2 | rep-4 (first 200) | mean length | reached EOS |",
             "| --- | --- | --- | --- | --- | --- |"]
    for t, r in s["by_temperature"].items():
        lines.append(f"| {t} | {r['distinct_1']:.3f} | {r['distinct_2']:.3f} | {r['repetition_rate_4']:.3f} | "
                     f"{r['mean_length']:.1f} of {r['max_new_tokens']} | {r['reached_eos']:.2f} |")
    for t, r in s["by_temperature"].items():
        lines += ["", f"### Samples at temperature {t}", ""]
        for sample in r["samples"]:
            lines += ["```", sample["prompt"][-300:] + " ⟶ " + sample["continuation"][:600], "```"]
    return lines + [""]


def _state_markdown(s: dict) -> list[str]:
    lines = ["## Memory reliance (`state`)", "",
             f"{s['items_per_cell']} unseen MQAR items per cell. SSM cut: the Mamba layers restart at the first query "
             "(attention still sees the bindings). Attention cut: attention sees "
             f"{s['attention_window']} tokens before the first query (the SSM intact). Reliance = (full - cut) / full; "
             "p: McNemar's test on the paired answers with the item as the unit (an item's answers share its "
             "sequence); `results.json` also holds the test over answers (`mcnemar`), which takes them as "
             "independent. A p marked * is that one: results written before the test over items.", "",
             "| pairs | length | answers | full | SSM cut | reliance | p | attention cut | reliance | p |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in s["cells"]:
        cells = [str(c["pairs"]), str(c["seq_len"]), f"{c['answers']:,}", f"{c['accuracy']['full']:.4f}"]
        for cut in ("ssm_cut", "attention_cut"):
            if isinstance(c[cut], dict):
                rel = c[cut]["reliance"]
                cells += [f"{c['accuracy'][cut]:.4f}", "-" if rel is None else f"{rel:.3f}", cut_p_value(c[cut])]
            else:
                cells += ["n/a", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "![state](state.png)", ""]


def cut_p_value(cut: dict) -> str:
    """A cut's p-value as the reports print it: the test over items, else (older results) the one over answers,
    marked *."""
    if "mcnemar_items" in cut:
        return p_text(cut["mcnemar_items"]["p_value"])
    return p_text(cut["mcnemar"]["p_value"]) + "*"


def p_text(p: float) -> str:
    """A p-value as the reports print it (a float64 tail can underflow to 0)."""
    return f"{p:.2g}" if p > 0 else "< 1e-300"


def _plot_ppl(s: dict, out: Path) -> str:
    names = list(s["by_source"])
    fig, ax = plots.pyplot().subplots(figsize=(max(4, 1.2 * len(names) + 2), 4))
    ax.bar(names + ["all"], [s["by_source"][n]["loss"] for n in names] + [s["loss"]],
           color=[f"C{k % 10}" for k in range(len(names))] + ["k"])
    ax.set_ylabel("validation loss (nats/token)")
    return plots.save(fig, ax, out / "ppl.png", legend_size=None, grid_axis="y")


def _plot_length(s: dict, out: Path) -> str:
    fig, ax = plots.pyplot().subplots(figsize=(8, 5))
    for k, (name, row) in enumerate(s["by_length"].items()):
        groups = positions.octave_groups(row["bins"])
        mids = [(b["start"] + b["end"]) / 2 for b in groups]
        ax.plot(mids, [b["loss"] for b in groups], "o-", color=f"C{k % 10}", lw=1.2, ms=3,
                label=f"{name} ({row['window']} tokens)")
    ax.axvline(s["train_len"], color="k", ls="--", lw=0.8, label="training length")
    ax.set_xscale("log")
    ax.set_xlabel("token position (bins pooled per quarter octave)")
    ax.set_ylabel("loss (nats/token)")
    return plots.save(fig, ax, out / "length.png")


def _plot_lm_eval(s: dict, out: Path) -> str:
    labels, values, errors = [], [], []
    for task, row in s["tasks"].items():
        for metric, value in sorted(row.items()):
            if not metric.endswith("_stderr"):
                labels.append(f"{task}\n{metric}")
                values.append(value)
                err = row.get(f"{metric}_stderr")
                errors.append(err if isinstance(err, float) and err == err else 0.0)
    fig, ax = plots.pyplot().subplots(figsize=(max(4, 1.3 * len(labels) + 2), 4))
    ax.bar(range(len(values)), values, yerr=errors, color=[f"C{k % 10}" for k in range(len(values))], capsize=3)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    return plots.save(fig, ax, out / "lm_eval.png", legend_size=None, grid_axis="y")


def _plot_mqar(s: dict, out: Path) -> str:
    fig, ax = plots.pyplot().subplots(figsize=(6, 4.5))
    for k, length in enumerate(sorted({c["seq_len"] for c in s["cells"]})):
        cells = sorted((c for c in s["cells"] if c["seq_len"] == length), key=lambda c: c["pairs"])
        ax.plot([c["pairs"] for c in cells], [c["accuracy"] for c in cells], "o-", color=f"C{k % 10}",
                label=f"length {length}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("accuracy (answers)")
    ax.set_ylim(-0.02, 1.02)
    return plots.save(fig, ax, out / "mqar.png")


def _plot_state(s: dict, out: Path) -> str:
    conditions = ("full", "ssm_cut", "attention_cut")
    cells = s["cells"]
    fig, ax = plots.pyplot().subplots(figsize=(max(5, 1.2 * len(cells) + 2), 4.5))
    width = 0.8 / len(conditions)
    for k, cond in enumerate(conditions):
        ax.bar([i + k * width for i in range(len(cells))], [c["accuracy"].get(cond, 0.0) for c in cells], width,
               color=f"C{k}", label=cond.replace("_", " "))
    ax.set_xticks([i + width for i in range(len(cells))], [f"{c['pairs']} pairs\n{c['seq_len']}" for c in cells],
                  fontsize=7)
    ax.set_ylabel("accuracy (answers)")
    ax.set_ylim(0, 1.02)
    return plots.save(fig, ax, out / "state.png", grid_axis="y")


def _plot_niah(s: dict, out: Path) -> str:
    import numpy as np

    ks = sorted({c["multiple"] for c in s["cells"]})
    depths_ = sorted({c["depth"] for c in s["cells"]})
    acc = {(c["multiple"], c["depth"]): c["accuracy"] for c in s["cells"]}
    grid = np.array([[acc[(k, d)] for k in ks] for d in depths_])
    fig, ax = plots.pyplot().subplots(figsize=(1.2 * len(ks) + 3, 0.35 * len(depths_) + 2))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(ks)), [f"{k}x ({k * s['train_len']})" for k in ks], fontsize=8)
    ax.set_yticks(range(len(depths_)), [f"{d:.0%}" for d in depths_], fontsize=8)
    ax.set_xlabel("context (multiple of the training length)")
    ax.set_ylabel("needle depth")
    fig.colorbar(im, ax=ax, label="accuracy")
    return plots.save(fig, ax, out / "niah.png", legend_size=None, grid_axis=None)
