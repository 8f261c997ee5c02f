"""``report.md`` of ``compare``: the runs, their training health, validation by source, the eval results side by
side and over training, the paired MQAR tests, and a section per architecture family (its size law, backtest,
replicates, red flags), the prediction and the compute-optimal sizes, and the recipe differences. A function of
the summary ``compare`` writes (``summary.json``) alone."""

from __future__ import annotations

from hybrid_megatron.eval import eval_curves, paired_runs, size_fits, size_units, training_health


def markdown(summary: dict) -> str:
    """``report.md`` of a comparison, from the summary ``compare`` writes as ``summary.json``."""
    lines = ["# Runs compared", "", "| run | family | parameters | tokens | final train loss | final validation loss |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in summary["runs"]:
        val = f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else "-"
        lines.append(f"| {r['name']} | `{r['family']}` | {r['params']:,} | {r['tokens']:,} | {r['final_train_loss']:.4f} "
                     f"| {val} |")
    if summary["not_started"]:
        lines += ["", f"Not started yet (left out): {', '.join(summary['not_started'])}."]
    if summary["unfinished"]:
        lines += ["", "Still short of their planned steps, so left out of the size laws: " + ", ".join(
            f"{u['name']} (step {u['step']:,} of {u['planned']:,})" for u in summary["unfinished"]) + "."]
    lines += ["", *training_health.markdown({r["name"]: r["health"] for r in summary["runs"]})]
    lines += _eval_table(summary["runs"])
    lines += _source_table(summary["validation_by_source"])
    curves = summary["eval_curves"]
    if curves:
        lines += ["", "## Evaluations over training", "", "![eval results against tokens](evals_vs_tokens.png)", ""]
        if curves["left_out"]:
            lines += [f"Not drawn ({eval_curves.MAX_PANELS} panels at most): {', '.join(curves['left_out'])}.", ""]
    if summary.get("mqar_paired"):
        lines += paired_runs.markdown(summary["mqar_paired"])
    lines += ["", "![loss against tokens](loss_vs_tokens.png)", "", "![loss against FLOPs](loss_vs_flops.png)", ""]
    lines += _fit_sections(summary)
    lines += _recipe_section(summary)
    return "\n".join(lines)


def _source_table(by_source: dict[str, dict[str, float]] | None) -> list[str]:
    """The last validation loss per source, a column per run (a mixture's sources side by side)."""
    if not by_source:
        return []
    sources = sorted({k for metrics in by_source.values() for k in metrics if k != "validation"})
    lines = ["", "## Validation loss by source (each run's last validation)", "",
             "| source | " + " | ".join(by_source) + " |", "| --- |" + " --- |" * len(by_source)]
    for k in sources:
        cells = [f"{m[k]:.4f}" if k in m else "-" for m in by_source.values()]
        lines.append(f"| {k.removeprefix('validation/')} | " + " | ".join(cells) + " |")
    return lines + ["", "![validation loss by source against tokens](validation_by_source.png)"]


def _eval_table(runs: list[dict]) -> list[str]:
    """The eval results side by side: one row per metric, one column per run ('-' where a run lacks it)."""
    metrics = sorted({m for r in runs for m in r["eval"]})
    if not metrics:
        return []
    lines = ["", "## Evaluations (`hybrid-megatron eval`, each run's latest evaluated checkpoint)", "",
             "| metric | " + " | ".join(f"{r['name']} (step {r['eval_step']})" if r["eval"] else r["name"]
                                      for r in runs) + " |",
             "| --- |" + " --- |" * len(runs)]
    for m in metrics:
        cells = [f"{r['eval'][m]:.4f}" if m in r["eval"] else "-" for r in runs]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _fit_sections(summary: dict) -> list[str]:
    """A section per family: its runs, its size law or why there is none, its red flags; then the prediction."""
    if not any(fam["scaling_fit"] or fam["scaling_fit_nd"] for fam in summary["families"]):
        prediction = size_fits.prediction_lines(summary["prediction"]) if summary["prediction"] else []
        why = ("; ".join(f"`{fam['label']}`, {fam['note']}" for fam in summary["families"])
               or "no run has a validation loss (val.jsonl)")
        optimal = size_fits.compute_optimal_lines(summary["compute_optimal"]) if summary["compute_optimal"] else []
        return ["## Size laws", "", f"None fitted: {why}.", "", *prediction, *([""] if prediction else []),
                *optimal, *([""] if optimal else [])]
    lines = ["## Size laws by architecture family", "",
             f"Size: {summary['size_measure']}; loss: "
             + (f"the `{summary['source']}` validation source's" if summary["source"] else "the overall validation loss")
             + ". A family is one layer-pattern unit with the same non-size model "
             "fields (or a `--family` label).", ""]
    for fam in summary["families"]:
        lines += [f"### `{fam['label']}`", "", f"Runs: {', '.join(fam['runs'])}.", ""]
        fit, nd = fam["scaling_fit"], fam["scaling_fit_nd"]
        if fit:
            ci = fit["alpha_ci"]
            ci_text = f" (95% bootstrap interval {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
            note = f" {fit['note'][0].upper()}{fit['note'][1:]}." if "note" in fit else ""
            lines += [f"L(N) = {fit['E']:.4f} + {fit['A']:.4g} * N^-{fit['alpha']:.4f}{ci_text}, over {fit['runs']} "
                      f"runs.{note}", ""]
            if "subset" in fit:
                lines += [f"{fit['subset'][0].upper()}{fit['subset'][1:]}.", ""]
            test = fit["backtest"]
            if test:
                held = size_units.count_text(test["held_out"], summary["size_measure"])
                lines += [f"Backtest: fitted without the largest size ({held}, {test['extrapolation']:.1f}x the next), "
                          f"the law predicts {test['predicted']:.4f} there against {test['actual']:.4f} measured "
                          f"({test['error']:+.2%}).", ""]
        else:
            lines += [f"{fam['note'][0].upper()}{fam['note'][1:]}.", ""]
        if nd:
            lines += [f"L(N, D) = {nd['E']:.4f} + {nd['A']:.4g}/N^{nd['alpha']:.4f} + {nd['B']:.4g}/D^{nd['beta']:.4f}, "
                      f"over {nd['runs']} runs.", ""]
        for rep in fam["replicates"]:
            lines.append(f"- {len(rep['runs'])} runs of {size_units.count_text(rep['size'], summary['size_measure'])} on "
                         f"{size_units.count_text(rep['tokens'])} tokens (other seeds): {rep['mean']:.4f} +- "
                         f"{rep['sd']:.4f} (sd)")
        lines += [f"- red flag: {flag}" for flag in fam["red_flags"]]
        lines += [""] if fam["red_flags"] or fam["replicates"] else []
    if any(fam["scaling_fit"] for fam in summary["families"]):
        lines += ["![scaling fit](scaling_fit.png)", ""]
    if summary["prediction"]:
        lines += ["## Prediction", ""] + size_fits.prediction_lines(summary["prediction"]) + [""]
    if summary["compute_optimal"]:
        lines += ["## Compute-optimal size", ""] + size_fits.compute_optimal_lines(summary["compute_optimal"]) + [""]
    if summary["comparison_flags"]:
        lines += ["## Red flags of the comparison", ""] + [f"- {flag}" for flag in summary["comparison_flags"]] + [""]
    return lines


def _recipe_section(summary: dict) -> list[str]:
    """Where runs differ in more than their architecture and size: within a family a law mixes the recipe into the
    size; between families the comparison is of recipes too."""
    lines = []
    for fam in summary["families"]:
        lines += _differences(fam["recipe_differences"], f"within `{fam['label']}`")
    lines += _differences(summary["recipe_differences"], "between the families")
    return ["## Recipe differences", "", *lines, ""] if lines else []


def _differences(differences: dict[str, dict[str, list[str]]], what: str) -> list[str]:
    """One line per recipe key on which runs differ, its values with the runs that hold them."""
    return [f"- {what}: `{key}` " + "; ".join(f"{value} ({', '.join(names)})" for value, names in values.items())
            for key, values in differences.items()]
