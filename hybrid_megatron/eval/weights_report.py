"""What ``hybrid-megatron inspect`` writes: ``inspect.json``, ``report.md``, ``timescales.png`` (each SSM head's
memory horizon by layer) and ``layers.png`` (each layer's weight RMS and, with ``--against``, how far it moved)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hybrid_megatron.eval import plots
from hybrid_megatron.eval.weights import SHORT_TOKENS, STILL

RESULTS = "inspect.json"
_COLORS = {"mamba": "C0", "gdn": "C4", "attention": "C3", "mlp": "C2", "moe": "C1"}


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pictures = {"layers": _plot_layers(result, out / "layers.png")}
    if any("ssm" in layer for layer in result["layers"]):
        pictures["timescales"] = _plot_timescales(result, out / "timescales.png")
    result = {**result, "plots": pictures}
    tmp = out / f".{RESULTS}.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out / RESULTS)
    (out / "report.md").write_text(markdown(result))


def _number(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    compared = result["against"] is not None
    context = result["context"]
    lines = [f"# Weights of {result['checkpoint']}", "",
             f"Step {result['step']}, pattern `{result['pattern']}`"
             + (f", against {result['against']}" if compared else "") + ".", "",
             "| layer | type | weight RMS |" + (" relative change |" if compared else "")
             + " SSM heads | tau min / median / max (tokens) |" + (" median tau before |" if compared else "")
             + " heads < " + f"{SHORT_TOKENS} tokens |"
             + (f" heads >= {context} (training length) |" if context else "") + " mean abs D |",
             "| --- | --- | --- |" + (" --- |" if compared else "") + " --- | --- |" + (" --- |" if compared else "")
             + " --- |" + (" --- |" if context else "") + " --- |"]
    for layer in result["layers"]:
        row = [str(layer["index"]), layer["type"], _number(layer["rms"], ".4f")]
        if compared:
            row.append(_number(layer["relative_change"], ".3f"))
        ssm = layer.get("ssm")
        if ssm:
            row += [str(ssm["heads"]), f"{ssm['min']:.3g} / {ssm['median']:.3g} / {ssm['max']:.3g}"]
            row += [f"{ssm['median_before']:.3g}"] if compared else []
            row.append(str(ssm["short_heads"]))
            row += [str(ssm["context_heads"])] if context else []
            row.append(f"{sum(abs(d) for d in ssm['D']) / len(ssm['D']):.3f}" if "D" in ssm else "-")
        else:
            row += ["-", "-"] + (["-"] if compared else []) + ["-"] + (["-"] if context else []) + ["-"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "tau = 1 / (exp(A_log) * softplus(dt_bias)): the tokens over which a head's state decays to 1/e at "
              "the bias step; the input moves each token's step around it.", ""]
    if not context:
        lines += ["The checkpoint records no training length (pass --context N to count the heads that reach it).", ""]
    lines += _experts_lines(result["layers"], compared)
    lines += _heads_lines(result["layers"], compared)
    ends = result["ends"]
    if ends:
        lines += ["| tensor | shape | RMS |" + (" relative change |" if compared else ""),
                  "| --- | --- | --- |" + (" --- |" if compared else "")]
        for key, stats in ends.items():
            cells = [key, "x".join(map(str, stats["shape"])), _number(stats["rms"], ".4f")]
            if compared:
                cells.append(_number(stats["relative_change"], ".3f"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"![{name}]({file})" for name, file in result.get("plots", {}).items()] + [""]
    return "\n".join(lines)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _experts_lines(layers: list[dict], compared: bool) -> list[str]:
    """A table per MoE layer: each routed expert's weights, movement, router row and routing bias."""
    lines = []
    for layer in layers:
        experts = layer.get("experts")
        if not experts:
            continue
        head = ["expert", "weight RMS", *(["relative change"] if compared else []), "router row norm", "routing bias"]
        rows = [[str(j), f"{experts['rms'][j]:.4f}",
                 *([_number(experts["relative_change"][j], ".3f")] if compared else []),
                 _number(experts["router_norm"][j], ".3f") if "router_norm" in experts else "-",
                 _number(experts["expert_bias"][j], "+.4f") if "expert_bias" in experts else "-"]
                for j in range(experts["count"])]
        lines += [f"Layer {layer['index']} (MoE), its {experts['count']} routed experts:", "", *_table(head, rows)]
        if experts.get("still"):
            lines += ["", f"Experts {', '.join(map(str, experts['still']))} moved less than {STILL:g} of the layer's median "
                      "expert: they have barely trained (too few tokens routed to them)."]
        lines.append("")
    return lines


def _heads_lines(layers: list[dict], compared: bool) -> list[str]:
    """A table per attention layer: each query head's query and output norms (and movement)."""
    lines = []
    for layer in layers:
        heads = layer.get("heads")
        if not heads:
            continue
        head = ["head", "query norm", "output norm", *(["relative change"] if compared else [])]
        rows = [[str(h), f"{heads['query_norm'][h]:.3f}", f"{heads['output_norm'][h]:.3f}",
                 *([f"{heads['relative_change'][h]:.3f}"] if compared else [])] for h in range(heads["count"])]
        lines += [f"Layer {layer['index']} (attention), its {heads['count']} query heads:", "", *_table(head, rows)]
        if heads["quiet"]:
            lines += ["", f"Heads {', '.join(map(str, heads['quiet']))} write back less than {STILL:g} of the layer's "
                      "median head (output-projection norm): they barely contribute."]
        lines.append("")
    return lines


def _plot_layers(result: dict, path: Path) -> str:
    compared = result["against"] is not None
    fig, axes = plots.pyplot().subplots(2 if compared else 1, 1, figsize=(8, 6 if compared else 3.5), squeeze=False)
    layers = result["layers"]
    colors = [_COLORS.get(layer["type"], "grey") for layer in layers]
    panels = [("rms", "weight RMS")] + ([("relative_change", "||W - W0|| / ||W0||")] if compared else [])
    for ax, (field, label) in zip(axes[:, 0], panels):
        ax.bar([layer["index"] for layer in layers], [layer[field] or 0.0 for layer in layers], color=colors)
        ax.set_ylabel(label, fontsize=8)
        ax.set_xlabel("layer", fontsize=8)
    for kind, color in _COLORS.items():
        if any(layer["type"] == kind for layer in layers):
            axes[0, 0].bar([], [], color=color, label=kind)
    return plots.save(fig, axes[0, 0], path, legend_size=7, grid_axis="y")


def _plot_timescales(result: dict, path: Path) -> str:
    fig, ax = plots.pyplot().subplots(figsize=(8, 4))
    for layer in result["layers"]:
        ssm = layer.get("ssm")
        if ssm:
            ax.plot([layer["index"]] * ssm["heads"], ssm["timescales"], "o", ms=4, alpha=0.7,
                    color=_COLORS[layer["type"]])
            if "timescales_before" in ssm:  # hollow: where they started
                ax.plot([layer["index"] + 0.2] * ssm["heads"], ssm["timescales_before"], "o", ms=4, mfc="none",
                        color=_COLORS[layer["type"]], alpha=0.5)
    for kind in ("mamba", "gdn"):
        if any(layer["type"] == kind and "ssm" in layer for layer in result["layers"]):
            ax.plot([], [], "o", color=_COLORS[kind], label=kind)
    if result["against"]:
        ax.plot([], [], "o", mfc="none", color="grey", label="the same heads in --against")
    ax.axhline(SHORT_TOKENS, color="grey", lw=0.8, ls=":", label=f"{SHORT_TOKENS} tokens")
    if result["context"]:
        ax.axhline(result["context"], color="grey", lw=0.8, ls="--", label=f"training length {result['context']}")
    ax.set_yscale("log")
    ax.set_xlim(-0.5, len(result["layers"]) - 0.5)  # every layer has its place: the attention and MLP ones show as gaps
    ax.set_xlabel("layer")
    ax.set_ylabel("tau: tokens to decay to 1/e")
    return plots.save(fig, ax, path, legend_size=7)
