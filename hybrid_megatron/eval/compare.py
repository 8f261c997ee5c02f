"""``hybrid-megatron compare RUN_DIR... --out DIR``: runs side by side, on a CPU.

Reads each run directory as ``pretrain`` leaves it: ``config.yaml`` (the resolved config: parameters by the
project's own counter, FLOPs per token; the input tokens of each step, loss-masked ones included, come from its
data schedule), ``losses.jsonl`` (train loss per step), ``val.jsonl``
(validation loss) and ``eval/<step dir>/results.json`` (``hybrid-megatron eval``; the latest step's are
shown side by side). Writes ``DIR/loss_vs_tokens.png`` and ``DIR/loss_vs_flops.png`` (every run on one plot,
train as lines, validation as markers), ``DIR/summary.json`` and ``DIR/report.md``. With three or more
runs of different sizes it fits L(N) = E + A N^-alpha to their last validation losses (``scaling.py``),
with a bootstrap interval for alpha, and lists the red flags; with five or more runs that also differ in
tokens, L(N, D) = E + A/N^alpha + B/D^beta as well. Runs evaluated with ``--suite mqar`` on the same items are
tested against the first of them, item by item (``paired_runs.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.config import load_yaml_mapping
from data_pipeline.errors import ConfigError, DataError
from hybrid_megatron.config import RunConfig
from hybrid_megatron.config_io import build
from hybrid_megatron.eval import paired_runs, plots, report, scaling

log = logging.getLogger(__name__)
MIN_SIZE_SPREAD = 1.5  # largest / smallest model before a size law is fitted
TRAIN_TAIL = 0.1  # the last 10% of logged steps give a run's final train loss (one step is noisy)


@dataclass
class Run:
    name: str
    path: Path
    params: int
    train: list[tuple[int, float, float]] = field(default_factory=list)  # (tokens so far, FLOPs so far, loss)
    val: list[tuple[int, float, float]] = field(default_factory=list)
    eval_step: int | None = None
    eval: dict[str, float] = field(default_factory=dict)  # headline numbers of the latest eval results
    mqar: dict | None = None  # the latest eval's mqar suite (its outcomes per item), for the paired comparison

    @property
    def final_train(self) -> float | None:
        if not self.train:
            return None
        tail = self.train[-max(1, int(len(self.train) * TRAIN_TAIL)):]
        return sum(loss for *_, loss in tail) / len(tail)

    @property
    def final_val(self) -> float | None:
        return self.val[-1][2] if self.val else None


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(f"{path}:{n}: not a JSON record") from None
    return out


@contextlib.contextmanager
def _record(path: Path, line: int):
    """A record of the run's logs that is not what pretrain writes: one line naming it."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}:{line}: not a record pretrain writes ({type(exc).__name__}: {exc})") from None


def _vocab(cfg: RunConfig, run_dir: Path) -> int:
    """The run's vocabulary: the config's, the tokenizer its checkpoints record, or its data's."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    from hybrid_megatron.checkpoint import layout

    save_dir = Path(cfg.checkpoint.save_dir) if cfg.checkpoint.save_dir else run_dir / "checkpoints"
    latest = layout.read_latest(save_dir) if save_dir.is_dir() else None
    recorded = layout.read_data_tokenizer(latest) if latest else None
    if recorded:
        return recorded["vocab_size"]
    try:
        from data_pipeline.loader import config_vocab_size

        return config_vocab_size(cfg.data)
    except (ConfigError, DataError):
        raise ConfigError(f"{run_dir}: cannot tell the vocabulary (no model.vocab_size, no checkpoint with a "
                          "recorded tokenizer, data not found)") from None


def load_run(run_dir: str | Path) -> Run:
    from data_pipeline.schedule import step_input_tokens
    from hybrid_megatron.model.build import padded_vocab_size
    from hybrid_megatron.model.flops import num_parameters, training_flops_per_token

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml (not a run directory written by pretrain)")
    try:
        cfg = build(RunConfig, load_yaml_mapping(config_path))
    except ConfigError as exc:
        message = str(exc) if str(exc).startswith(str(config_path)) else f"{config_path}: {exc}"
        raise ConfigError(f"{message} (not the resolved config pretrain writes)") from None
    padded = padded_vocab_size(_vocab(cfg, run_dir), cfg.model, cfg.parallel.tensor_model_parallel_size)
    run = Run(name=run_dir.name, path=run_dir, params=num_parameters(cfg.model, padded))
    tokens = flops = 0.0
    at_step = {}
    for n, r in enumerate(_jsonl(run_dir / "losses.jsonl"), 1):
        with _record(run_dir / "losses.jsonl", n):
            step_tokens = step_input_tokens(cfg.data, int(r["seq_len"]))  # losses.jsonl's "tokens" are loss tokens
            tokens += step_tokens
            flops += step_tokens * training_flops_per_token(cfg.model, padded, int(r["seq_len"]))
            at_step[r["step"]] = (tokens, flops)
            if not r.get("skipped"):
                run.train.append((int(tokens), flops, float(r["loss"])))
    for n, r in enumerate(_jsonl(run_dir / "val.jsonl"), 1):
        with _record(run_dir / "val.jsonl", n):
            if r["step"] in at_step:
                run.val.append((int(at_step[r["step"]][0]), at_step[r["step"]][1], float(r["loss"])))
    if not run.train:
        raise DataError(f"{run_dir}/losses.jsonl: no training steps recorded")
    latest = _latest_eval(run_dir)
    if latest is not None:
        try:
            run.eval_step, run.eval = latest["step"], report.headline(latest)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{run_dir}/eval: the latest results.json is not what eval writes ({type(exc).__name__}: "
                            f"{exc}); edited or damaged") from None
        run.mqar = latest["suites"].get("mqar")
    return run


def _latest_eval(run_dir: Path) -> dict | None:
    """The eval results of the run's latest evaluated checkpoint (``eval/step-N/results.json``)."""
    found = sorted(run_dir.glob(f"eval/step-*/{report.RESULTS}"), key=lambda p: p.parent.name)
    return report.read(found[-1]) if found else None


def compare(run_dirs: list[str], out_dir: str | Path) -> dict:
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        runs = [dataclasses.replace(r, name=f"{r.path.parent.name}/{r.name}") for r in runs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"runs": [{"name": r.name, "path": str(r.path), "params": r.params, "tokens": r.train[-1][0],
                               "flops": r.train[-1][1], "final_train_loss": r.final_train,
                               "final_val_loss": r.final_val, "eval_step": r.eval_step, "eval": r.eval}
                              for r in runs]}
    with_val = [r for r in runs if r.final_val is not None]
    sizes = sorted({r.params for r in with_val})
    spread = len(sizes) >= 3 and sizes[-1] >= MIN_SIZE_SPREAD * sizes[0]
    if spread:
        params = [r.params for r in with_val]
        losses = [r.final_val for r in with_val]
        law = scaling.fit_power_law(params, losses)
        interval = scaling.bootstrap_alpha(params, losses)
        summary["scaling_fit"] = {"alpha": law.alpha, "alpha_ci": interval, "E": law.E, "A": law.A,
                                  "runs": len(with_val), "law": "L(N) = E + A * N^-alpha (N: parameters)"}
        if interval is None:
            summary["scaling_fit"]["note"] = ("three sizes: the three parameters pass through every point (no "
                                              "degrees of freedom left), so there is no interval; a fourth size gives one")
        summary["red_flags"] = scaling.red_flags(params, losses, [r.final_train for r in with_val], law.alpha)
    else:
        summary["scaling_fit"] = None
        summary["red_flags"] = []
        if len(sizes) >= 3:
            summary["note"] = (f"no fit: the sizes span {sizes[-1] / sizes[0]:.2f}x, under {MIN_SIZE_SPREAD}x (runs of "
                               "about one size: a comparison of architectures or recipes, not a size sweep)")
        elif len(runs) >= 3:
            summary["note"] = "no fit: fewer than three runs of different sizes have a validation loss"
    summary["scaling_fit_nd"] = None
    token_counts = {r.val[-1][0] for r in with_val}
    if len(with_val) >= 5 and len(sizes) >= 2 and sizes[-1] >= MIN_SIZE_SPREAD * sizes[0] and len(token_counts) >= 2:  # runs that vary tokens too
        law2 = scaling.fit_chinchilla([r.params for r in with_val], [r.val[-1][0] for r in with_val],
                                      [r.final_val for r in with_val])
        summary["scaling_fit_nd"] = {"E": law2.E, "A": law2.A, "alpha": law2.alpha, "B": law2.B, "beta": law2.beta,
                                     "runs": len(with_val), "law": "L(N, D) = E + A/N^alpha + B/D^beta (D: tokens)"}
    summary["mqar_paired"] = paired_runs.compare_runs([(r.name, r.mqar) for r in runs])
    _plot(runs, out)
    if summary["scaling_fit"]:
        _plot_fit(with_val, summary["scaling_fit"], out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "report.md").write_text(_report(summary))
    return summary


def _plot(runs: list[Run], out: Path) -> None:
    for axis, index, label in (("tokens", 0, "tokens"), ("flops", 1, "training FLOPs")):
        fig, ax = plots.pyplot().subplots(figsize=(8, 5))
        for k, r in enumerate(runs):
            color = f"C{k % 10}"
            ax.plot([p[index] for p in r.train], [p[2] for p in r.train], color=color, alpha=0.6, lw=1,
                    label=f"{r.name} ({r.params / 1e6:.1f}M) train")
            if r.val:
                ax.plot([p[index] for p in r.val], [p[2] for p in r.val], "o-", color=color, ms=4,
                        label=f"{r.name} validation")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        plots.save(fig, ax, out / f"loss_vs_{axis}.png", legend_size=7)


def _plot_fit(runs: list[Run], fit: dict, out: Path) -> None:
    """Final validation loss against parameters, with the fitted law."""
    import numpy as np

    law = scaling.PowerLaw(fit["E"], fit["A"], fit["alpha"], 0.0)
    n = np.array([r.params for r in runs], dtype=np.float64)
    grid = np.exp(np.linspace(np.log(n.min() / 1.5), np.log(n.max() * 3), 100))
    fig, ax = plots.pyplot().subplots(figsize=(6, 4.5))
    ax.plot(grid, law(grid), "k--", lw=1, label=f"E + A N^-alpha, alpha {fit['alpha']:.3f}, E {fit['E']:.3f}")
    for k, r in enumerate(runs):
        ax.plot([r.params], [r.final_val], "o", color=f"C{k % 10}", label=r.name)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("final validation loss")
    plots.save(fig, ax, out / "scaling_fit.png", legend_size=7)


def _report(summary: dict) -> str:
    lines = ["# Runs compared", "", "| run | parameters | tokens | final train loss | final validation loss |",
             "| --- | --- | --- | --- | --- |"]
    for r in summary["runs"]:
        val = f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else "-"
        lines.append(f"| {r['name']} | {r['params']:,} | {r['tokens']:,} | {r['final_train_loss']:.4f} | {val} |")
    lines += _eval_table(summary["runs"])
    if summary.get("mqar_paired"):
        lines += paired_runs.markdown(summary["mqar_paired"])
    fit = summary["scaling_fit"]
    lines += ["", "![loss against tokens](loss_vs_tokens.png)", "", "![loss against FLOPs](loss_vs_flops.png)", ""]
    if fit:
        ci = fit["alpha_ci"]
        ci_text = f" (95% bootstrap interval {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
        lines += ["## Scaling fit", "", f"L(N) = {fit['E']:.4f} + {fit['A']:.4g} * N^-{fit['alpha']:.4f}{ci_text}, "
                  f"over {fit['runs']} runs." + (f" {fit['note'][0].upper()}{fit['note'][1:]}." if "note" in fit else ""),
                  "", "![scaling fit](scaling_fit.png)", ""]
    nd = summary.get("scaling_fit_nd")
    if nd:
        lines += ["## Size and tokens", "", f"L(N, D) = {nd['E']:.4f} + {nd['A']:.4g}/N^{nd['alpha']:.4f} + "
                  f"{nd['B']:.4g}/D^{nd['beta']:.4f}, over {nd['runs']} runs.", ""]
    if summary["red_flags"]:
        lines += ["## Red flags", ""] + [f"- {flag}" for flag in summary["red_flags"]] + [""]
    return "\n".join(lines)


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
