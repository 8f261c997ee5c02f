"""``hybrid-megatron compare RUN_DIR... --out DIR``: runs side by side, on a CPU.

Reads each run directory as ``pretrain`` leaves it: ``config.yaml`` (the resolved config: parameters by the
project's own counter, FLOPs per token; the input tokens of each step, loss-masked ones included, come from its
data schedule), ``losses.jsonl`` (train loss per step), ``val.jsonl``
(validation loss) and ``eval/<step dir>/results.json`` (``hybrid-megatron eval``; the latest step's are
shown side by side). Writes ``DIR/loss_vs_tokens.png`` and ``DIR/loss_vs_flops.png`` (every run on one plot,
train as lines, validation as markers), ``DIR/summary.json`` and ``DIR/report.md``. Runs are grouped into
architecture families (``families.py``: one layer-pattern unit and the same non-size fields), and each family
with three or more sizes gets its own size law, intervals, red flags and, with ``--predict``, its loss at a
larger size set against the other families' (``size_fits.py``; ``DIR/scaling_fit.png``). Runs evaluated with
``--suite mqar`` on the same items are tested against the first of them, item by item (``paired_runs.py``).
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
from hybrid_megatron.config_io import build, to_dict
from hybrid_megatron.eval import (compare_report, eval_curves, families, paired_runs, plots, size_fits, size_units,
                                  training_health)
from hybrid_megatron.model.config import ModelConfig

log = logging.getLogger(__name__)
TRAIN_TAIL = 0.1  # the last 10% of logged steps give a run's final train loss (one step is noisy)
LEGEND_RUNS = 8  # more runs than this: the loss plots' legend names families, not runs


@dataclass
class Run:
    name: str
    path: Path
    model: ModelConfig
    sizes: dict[str, int] = field(default_factory=dict)  # parameters by size_units.SIZE_MEASURES but flops
    train: list[tuple[int, float, float]] = field(default_factory=list)  # (tokens so far, FLOPs so far, loss)
    val: list[tuple[int, float, float]] = field(default_factory=list)
    evals: list[eval_curves.Evaluated] = field(default_factory=list)  # every evaluated checkpoint, by step
    health: dict = field(default_factory=dict)  # spike scores of losses.jsonl (training_health.py)
    val_by_source: list[eval_curves.Evaluated] = field(default_factory=list)  # each validation, per source too
    recipe: dict[str, str] = field(default_factory=dict)  # its training recipe, flattened (families.recipe)
    planned_steps: int = 0  # what its config trains (the data phases, or train.train_steps)
    steps: int = 0  # the last step losses.jsonl records

    @property
    def finished(self) -> bool:
        return self.steps >= self.planned_steps

    @property
    def params(self) -> int:
        return self.sizes["params"]

    @property
    def latest(self) -> eval_curves.Evaluated | None:
        return self.evals[-1] if self.evals else None

    @property
    def final_train(self) -> float | None:
        if not self.train:
            return None
        tail = self.train[-max(1, int(len(self.train) * TRAIN_TAIL)):]
        return sum(loss for *_, loss in tail) / len(tail)

    @property
    def final_val(self) -> float | None:
        return self.val[-1][2] if self.val else None


def read_jsonl(path: Path) -> list[dict]:
    """A run's JSON-lines log (losses.jsonl, val.jsonl), [] where it is missing; a bad line is one DataError."""
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
    from data_pipeline.schedule import build_schedule, step_input_tokens
    from hybrid_megatron.model.build import padded_vocab_size
    from hybrid_megatron.training.lr import planned_steps
    from hybrid_megatron.model.flops import (active_parameters, embedding_params, num_parameters,
                                             training_flops_per_token)

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: no config.yaml (not a run directory written by pretrain)")
    try:
        cfg = build(RunConfig, load_yaml_mapping(config_path))
    except ConfigError as exc:
        message = str(exc) if str(exc).startswith(str(config_path)) else f"{config_path}: {exc}"
        raise ConfigError(f"{message} (not the resolved config pretrain writes)") from None
    vocab = _vocab(cfg, run_dir)
    padded = padded_vocab_size(vocab, cfg.model, cfg.parallel.tensor_model_parallel_size)
    total = num_parameters(cfg.model, padded)
    # the vocabulary as resolved: a run that names it and one that reads it from its data are one family
    run = Run(name=run_dir.name, path=run_dir, model=dataclasses.replace(cfg.model, vocab_size=vocab),
              sizes={"params": total, "non-embedding": total - embedding_params(cfg.model, padded),
                     "active": active_parameters(cfg.model, padded)})
    tokens = flops = 0.0
    at_step = {}
    steps = []  # (step, loss, grad norm or None, skipped) for the spike scores
    for n, r in enumerate(read_jsonl(run_dir / "losses.jsonl"), 1):
        with _record(run_dir / "losses.jsonl", n):
            step_tokens = step_input_tokens(cfg.data, int(r["seq_len"]))  # losses.jsonl's "tokens" are loss tokens
            tokens += step_tokens
            flops += step_tokens * training_flops_per_token(cfg.model, padded, int(r["seq_len"]))
            at_step[r["step"]] = (tokens, flops)
            grad_norm = None if r.get("grad_norm") is None else float(r["grad_norm"])
            steps.append((int(r["step"]), float(r["loss"]), grad_norm, bool(r.get("skipped"))))
            if not r.get("skipped"):
                run.train.append((int(tokens), flops, float(r["loss"])))
    for n, r in enumerate(read_jsonl(run_dir / "val.jsonl"), 1):
        with _record(run_dir / "val.jsonl", n):
            if r["step"] in at_step:
                run.val.append((int(at_step[r["step"]][0]), at_step[r["step"]][1], float(r["loss"])))
                by_source = {f"validation/{k}": float(v) for k, v in (r.get("loss_by_source") or {}).items()}
                run.val_by_source.append(eval_curves.Evaluated(int(r["step"]), int(at_step[r["step"]][0]),
                                                               {"validation": float(r["loss"]), **by_source}, None))
    if not run.train:
        raise DataError(f"{run_dir}/losses.jsonl: no training steps recorded")
    run.health = training_health.health(steps)
    run.steps = max(step for step, *_ in steps)
    run.planned_steps = planned_steps(cfg, build_schedule(cfg.data))
    run.recipe = families.recipe(to_dict(cfg))
    run.evals = eval_curves.read(run_dir, {step: int(t) for step, (t, _) in at_step.items()})
    return run


def started(run_dir: str | Path) -> bool:
    """Whether pretrain has written the run's config and at least one training step."""
    losses = Path(run_dir) / "losses.jsonl"
    return (Path(run_dir) / "config.yaml").is_file() and losses.is_file() and losses.stat().st_size > 0


def compare(run_dirs: list[str], out_dir: str | Path, size_measure: str = "params", predict: float | None = None,
            family_of: dict[str, str] | None = None, partial: bool = False, budget: float | None = None,
            source: str | None = None) -> dict:
    """``family_of``: run directory (as given) -> a family label chosen by hand (``--family``). ``partial``:
    leave out the runs that have not started (listed as such), as a ladder's are while it trains. ``budget``:
    training FLOPs to find each family's compute-optimal size for (from its L(N, D)). ``source``: fit the size
    laws to this validation source's loss instead of the overall one (does code scale as prose does?)."""
    if size_measure not in size_units.SIZE_MEASURES:
        raise ConfigError(f"--size-by {size_measure!r}: one of {', '.join(size_units.SIZE_MEASURES)}")
    not_started = [str(d) for d in run_dirs if partial and not started(d)]
    left_out = {Path(d).resolve() for d in not_started}
    run_dirs = [d for d in run_dirs if Path(d).resolve() not in left_out]
    if not run_dirs:
        raise DataError(f"none of the {len(not_started)} runs has started (no config.yaml and losses.jsonl yet)")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        runs = [dataclasses.replace(r, name=f"{r.path.parent.name}/{r.name}") for r in runs]
    by_dir = {Path(d).resolve(): r.name for d, r in zip(run_dirs, runs)}
    by_hand = {}
    for d, label in (family_of or {}).items():
        if Path(d).resolve() in left_out:
            continue
        if Path(d).resolve() not in by_dir:
            raise ConfigError(f"--family names {d}, which is not among the runs compared")
        by_hand[by_dir[Path(d).resolve()]] = label
    grouped = families.group({r.name: r.model for r in runs}, by_hand)
    family_of_run = {name: label for label, members in grouped.items() for name in members}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"runs": [{"name": r.name, "path": str(r.path), "family": family_of_run[r.name], "params": r.params,
                               "params_by_measure": r.sizes, "tokens": r.train[-1][0], "flops": r.train[-1][1],
                               "steps": r.steps, "planned_steps": r.planned_steps,
                               "final_train_loss": r.final_train, "final_val_loss": r.final_val,
                               "eval_step": r.latest.step if r.latest else None,
                               "eval": r.latest.metrics if r.latest else {},
                               "evals": [{"step": e.step, "tokens": e.tokens, "metrics": e.metrics} for e in r.evals],
                               "health": r.health}
                              for r in runs],
                     "size_measure": size_measure, "source": source, "not_started": not_started}
    by_name = {r.name: r for r in runs}
    # a run short of its planned steps has not annealed: its loss sits above where it will end, off any law
    summary["unfinished"] = [{"name": r.name, "step": r.steps, "planned": r.planned_steps} for r in runs
                             if not r.finished]
    if source is not None:
        _check_source(runs, source)
    points = {label: [_point(by_name[n], size_measure, source) for n in members
                      if by_name[n].final_val is not None and by_name[n].finished]
              for label, members in grouped.items()}
    fits = size_fits.fit_families({label: p for label, p in points.items() if p}, size_measure)
    summary["families"] = [f.summary() for f in fits]
    for fam in summary["families"]:  # a law through runs of other recipes mixes the recipe into the size
        fam["recipe_differences"] = families.recipe_differences({n: by_name[n].recipe for n in grouped[fam["label"]]})
    within = {k for fam in summary["families"] for k in fam["recipe_differences"]}
    summary["recipe_differences"] = {k: v for k, v in families.recipe_differences(
        {r.name: r.recipe for r in runs}).items() if k not in within}  # between the families: what else they compare
    summary["comparison_flags"] = size_fits.comparison_flags(fits)
    summary["prediction"] = size_fits.predict(fits, predict, size_measure) if predict else None
    summary["compute_optimal"] = size_fits.compute_optimal(fits, budget) if budget else None
    summary["mqar_paired"] = paired_runs.compare_runs([(r.name, r.latest.mqar if r.latest else None) for r in runs])
    styles = _styles(runs, family_of_run)
    _plot(runs, styles, out)
    summary["eval_curves"] = eval_curves.plot({r.name: r.evals for r in runs}, out / "evals_vs_tokens.png", styles)
    # per source only where a run validates on two or more (one source is loss_vs_tokens.png again)
    by_source = {r.name: r.val_by_source for r in runs if r.val_by_source and len(r.val_by_source[-1].metrics) > 2}
    summary["validation_by_source"] = ({name: evals[-1].metrics for name, evals in by_source.items()}
                                       if by_source else None)
    if by_source:
        eval_curves.plot(by_source, out / "validation_by_source.png", styles)
    if any(f.law is not None for f in fits):
        size_fits.plot(fits, summary["prediction"], out / "scaling_fit.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "report.md").write_text(compare_report.markdown(summary))
    return summary


def _check_source(runs: list[Run], source: str) -> None:
    """Every run with a validation loss has it for ``source`` too (one line naming the first that has not)."""
    for r in runs:
        if r.val_by_source and f"validation/{source}" not in r.val_by_source[-1].metrics:
            known = sorted(k.removeprefix("validation/") for k in r.val_by_source[-1].metrics if k != "validation")
            raise ConfigError(f"--source {source}: {r.name} validates on {', '.join(known) or 'no named source'}")


def _point(r: Run, size_measure: str, source: str | None = None) -> size_fits.Point:
    """A run with a validation loss, as the size fits see it (its last validation loss, overall or on ``source``);
    its size in FLOPs is the training compute up to its last validation, where its loss was measured."""
    size = r.val[-1][1] if size_measure == "flops" else r.sizes[size_measure]
    loss = r.final_val if source is None else r.val_by_source[-1].metrics[f"validation/{source}"]
    return size_fits.Point(r.name, size, loss, r.final_train, r.val[-1][0], r.model.hidden_size, r.params,
                           r.val[-1][1])


def _styles(runs: list[Run], family_of_run: dict[str, str]) -> dict[str, dict]:
    """Each run's colour and legend label in every plot: a colour per family, darker the larger the run (a
    ladder's dozens of runs stay readable); up to ``LEGEND_RUNS`` runs a legend entry each, more one per family
    (on its largest run)."""
    labels = list(dict.fromkeys(family_of_run[r.name] for r in runs))
    styles = {}
    for family in labels:
        members = sorted((r for r in runs if family_of_run[r.name] == family), key=lambda r: r.params)
        for rank, r in enumerate(members):
            per_run = len(runs) <= LEGEND_RUNS
            styles[r.name] = {"color": f"C{labels.index(family) % 10}",
                              "alpha": 0.35 + 0.65 * (rank + 1) / len(members),  # the largest fully opaque
                              "label": f"{r.name} ({r.params / 1e6:.1f}M)" if per_run
                              else (family if rank == len(members) - 1 else None)}
    return styles


def _plot(runs: list[Run], styles: dict[str, dict], out: Path) -> None:
    """Loss against tokens and FLOPs: train as lines, validation as markers."""
    for axis, index, label in (("tokens", 0, "tokens"), ("flops", 1, "training FLOPs")):
        fig, ax = plots.pyplot().subplots(figsize=(8, 5))
        for r in runs:
            style = styles[r.name]
            ax.plot([p[index] for p in r.train], [p[2] for p in r.train], lw=1,
                    **{**style, "alpha": 0.6 * style["alpha"]})
            if r.val:
                ax.plot([p[index] for p in r.val], [p[2] for p in r.val], "o-", ms=4,
                        **{**style, "label": None})
        if any(r.val for r in runs):
            ax.plot([], [], "o", color="grey", ms=4, label="validation (lines: train)")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        plots.save(fig, ax, out / f"loss_vs_{axis}.png", legend_size=7)
