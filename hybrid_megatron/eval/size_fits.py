"""Size laws per architecture family (``compare``), and what each predicts at the size a larger run would have.

Every family (``families.py``) with three or more sizes spanning 1.5x gets L(N) = E + A N^-alpha fitted to its
runs' final validation losses, the runs resampled 1000 times for intervals (four or more sizes), red flags, and
with five or more runs that also differ in tokens L(N, D) = E + A/N^alpha + B/D^beta. With ``--predict N``
each fitted family's law is read at N with a 95% bootstrap interval; every other family is set against the
first one fitted (the reference): the difference of the predicted losses, its interval (the two families'
resamples are independent, drawn with different seeds) and the share of resamples in which the family's
loss is the lower one, plus the sizes where the two fitted curves cross. A prediction far past the largest
run says how far (the extrapolation factor): small-model fits read at 7B carry wide intervals for a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hybrid_megatron.eval import scaling
from hybrid_megatron.eval.size_units import count_text, unit

MIN_SIZE_SPREAD = 1.5  # largest / smallest model before a size law is fitted
DEAD_ZONE_HIDDEN = 512  # below this width architectures tend to look alike (small-scale architecture studies)


@dataclass(frozen=True, slots=True)
class Point:
    """One run as a size fit sees it."""

    name: str
    size: float  # in the chosen measure: a parameter count, or the training FLOPs up to the last validation
    final_val: float
    final_train: float | None
    tokens: int  # input tokens when the last validation ran
    hidden_size: int
    params: int  # total parameters, whatever the measure (for tokens per parameter)
    flops: float = 0.0  # training FLOPs up to the last validation

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


@dataclass
class FamilyFit:
    label: str
    points: list[Point]
    measure: str = "params"
    law_points: list[Point] = field(default_factory=list)  # the runs L(N) is fitted to: one data budget
    law: scaling.PowerLaw | None = None
    laws: list[scaling.PowerLaw] | None = None  # bootstrap refits (empty: fewer than four sizes)
    backtest: dict | None = None  # the law fitted without the largest size, read at that size
    nd: scaling.ChinchillaLaw | None = None  # L(N, D) over every run, where the runs vary in tokens too

    def summary(self) -> dict:
        out: dict = {"label": self.label, "runs": [p.name for p in self.points], "measure": self.measure,
                     "sizes": [p.size for p in self.points], "scaling_fit": None,
                     "scaling_fit_nd": None, "red_flags": []}
        sizes = sorted({p.size for p in self.law_points})
        if self.law is not None:
            ratio = float(np.median([p.tokens_per_param for p in self.law_points]))
            out["scaling_fit"] = {"alpha": self.law.alpha, "alpha_ci": scaling.interval([x.alpha for x in self.laws]),
                                  "E": self.law.E, "A": self.law.A, "runs": len(self.law_points),
                                  "tokens_per_param": ratio, "backtest": self.backtest,
                                  "law": f"L(N) = E + A * N^-alpha (N: {unit(self.measure)})"}
            if len(self.law_points) < len(self.points):
                out["scaling_fit"]["subset"] = (f"fitted to the {len(self.law_points)} runs of one data budget (about "
                                                f"{ratio:.3g} tokens per parameter); the family's other runs count in "
                                                "L(N, D)")
            if not self.laws:
                out["scaling_fit"]["note"] = ("three sizes: the law's three constants pass through every point (no degrees "
                                              "of freedom left), so there is no interval; a fourth size gives one")
            # the alpha < 0.1 rule of thumb is for parameters: loss falls far more slowly in compute
            alpha = None if self.measure == "flops" else self.law.alpha
            out["red_flags"] = scaling.red_flags([p.size for p in self.law_points],
                                                 [p.final_val for p in self.law_points],
                                                 [p.final_train for p in self.law_points], alpha)
        elif len(sizes) >= 3:
            out["note"] = (f"no fit: the sizes span {sizes[-1] / sizes[0]:.2f}x, under {MIN_SIZE_SPREAD}x (runs of "
                           "about one size: a comparison of recipes, not a size sweep)")
        else:
            out["note"] = f"no fit: {len(sizes)} distinct size(s) with a validation loss; a size law needs three"
        out["replicates"] = _replicates(self.points)
        if self.nd is not None:
            nd = self.nd
            out["scaling_fit_nd"] = {"E": nd.E, "A": nd.A, "alpha": nd.alpha, "B": nd.B, "beta": nd.beta,
                                     "runs": len(self.points), "law": "L(N, D) = E + A/N^alpha + B/D^beta (D: tokens)"}
        return out


def _replicates(points: list[Point]) -> list[dict]:
    """Runs of one size and token count (other seeds): their mean final validation loss and its spread."""
    groups: dict[tuple[float, int], list[Point]] = {}
    for p in points:
        groups.setdefault((p.size, p.tokens), []).append(p)
    out = []
    for (size, tokens), group in sorted(groups.items()):
        if len(group) >= 2:
            losses = np.array([p.final_val for p in group])
            out.append({"size": size, "tokens": tokens, "runs": [p.name for p in group], "mean": float(losses.mean()),
                        "sd": float(losses.std(ddof=1))})
    return out


def _groups(points: list[Point], key, tolerance: float) -> list[list[Point]]:
    """Points sorted by ``key`` and cut where it jumps by more than ``tolerance`` (a factor)."""
    ordered = sorted(points, key=key)
    groups = [[ordered[0]]]
    for p in ordered[1:]:
        if key(p) > tolerance * key(groups[-1][-1]):
            groups.append([])
        groups[-1].append(p)
    return groups


def law_points(points: list[Point]) -> list[Point]:
    """The runs L(N) is fitted to: those trained on one data budget, either the same tokens (a sweep at fixed
    data) or the same tokens per parameter (a ladder; with ``lengths`` it trains every model at several ratios,
    and a law through all of them would mix data scaling into size scaling). Of the groups either way (tokens
    within 5%, ratios within 25%), the one with the most sizes, then the most runs, then the fewest tokens."""
    groups = _groups(points, lambda p: p.tokens, 1.05) + _groups(points, lambda p: p.tokens_per_param, 1.25)
    best = max(groups, key=lambda g: (len({p.size for p in g}), len(g), -min(p.tokens for p in g)))
    return [p for p in points if p in best]  # in the order the runs came


def _fittable(points: list[Point]) -> bool:
    sizes = sorted({p.size for p in points})
    return len(sizes) >= 3 and sizes[-1] >= MIN_SIZE_SPREAD * sizes[0]


def _backtest(points: list[Point]) -> dict | None:
    """The law fitted without the runs of the largest size, read at that size against their mean loss: how well
    the family's law has extrapolated so far (four or more sizes)."""
    largest = max(p.size for p in points)
    rest = [p for p in points if p.size != largest]
    if len({p.size for p in points}) < 4 or not _fittable(rest):
        return None
    law = scaling.fit_power_law([p.size for p in rest], [p.final_val for p in rest])
    actual = float(np.mean([p.final_val for p in points if p.size == largest]))
    predicted = float(law(largest))
    return {"held_out": largest, "predicted": predicted, "actual": actual, "error": (predicted - actual) / actual,
            "extrapolation": largest / max(p.size for p in rest)}


def fit_families(families: dict[str, list[Point]], measure: str = "params", samples: int = 1000) -> list[FamilyFit]:
    """A law per family that has three or more sizes spanning ``MIN_SIZE_SPREAD`` at one tokens-per-parameter
    ratio; resamples seeded by the family's place, so that families are resampled independently and every run of
    compare is the same."""
    fits = []
    for k, (label, points) in enumerate(families.items()):
        fit = FamilyFit(label, points, measure, law_points(points))
        if _fittable(fit.law_points):
            n, loss = [p.size for p in fit.law_points], [p.final_val for p in fit.law_points]
            fit.law, fit.laws = scaling.fit_power_law(n, loss), scaling.bootstrap_laws(n, loss, samples, seed=k)
            fit.backtest = _backtest(fit.law_points)
        sizes = sorted({p.size for p in points})
        varied = len(sizes) >= 2 and sizes[-1] >= MIN_SIZE_SPREAD * sizes[0] and len({p.tokens for p in points}) >= 2
        if varied and len(points) >= 5 and measure != "flops":  # size and tokens both vary: L(N, D)
            fit.nd = scaling.fit_chinchilla([p.size for p in points], [p.tokens for p in points],
                                            [p.final_val for p in points])
        fits.append(fit)
    return fits


def predict(fits: list[FamilyFit], at: float, measure: str = "params") -> dict:
    """Each fitted family's loss at size ``at`` (in ``measure``), and every other family against the first fitted
    one."""
    fitted = [f for f in fits if f.law is not None]
    if not fitted:
        return {"at": at, "measure": measure, "reference": None, "by_family": [], "differences": [],
                "note": "no family has a size law to read there (each needs three or more sizes spanning "
                        f"{MIN_SIZE_SPREAD}x)"}
    by_family = []
    for f in fitted:
        draws = np.array([law(at) for law in f.laws])
        largest = max(p.size for p in f.law_points)
        by_family.append({"family": f.label, "loss": float(f.law(at)), "interval": scaling.interval(draws),
                          "extrapolation": at / largest})
    ref, differences = fitted[0], []
    for f in fitted[1:]:
        count = min(len(f.laws), len(ref.laws))
        gap = np.array([f.laws[i](at) - ref.laws[i](at) for i in range(count)])
        low = min(p.size for p in f.law_points + ref.law_points)
        high = max(at, *(p.size for p in f.law_points + ref.law_points))
        differences.append({"family": f.label, "difference": float(f.law(at) - ref.law(at)),
                            "interval": scaling.interval(gap),
                            "share_lower": float(np.mean(gap < 0)) if count else None,
                            "crossings": scaling.crossings(f.law, ref.law, low, high)})
    return {"at": at, "measure": measure, "reference": ref.label, "by_family": by_family, "differences": differences}


def comparison_flags(fits: list[FamilyFit]) -> list[str]:
    """Warning signs of an architecture comparison (two or more families with a fit)."""
    fitted = [f for f in fits if f.law is not None]
    if len(fitted) < 2:
        return []
    flags = []
    narrow = [f.label for f in fitted if max(p.hidden_size for p in f.points) < DEAD_ZONE_HIDDEN]
    if narrow:
        flags.append(f"every run of {', '.join(narrow)} is narrower than hidden {DEAD_ZONE_HIDDEN}, where architectures "
                     "tend to look alike: a difference (or none) there says little about larger models")
    spans = {f.label: (min(p.tokens for p in f.points), max(p.tokens for p in f.points)) for f in fitted}
    ref_low, ref_high = next(iter(spans.values()))
    if any(abs(lo / ref_low - 1) > 0.1 or abs(hi / ref_high - 1) > 0.1 for lo, hi in spans.values()):
        text = "; ".join(f"{label}: {lo / 1e6:.1f}M-{hi / 1e6:.1f}M" for label, (lo, hi) in spans.items())
        flags.append(f"the families were trained on different numbers of tokens ({text}): their laws differ in data "
                     "as well as architecture")
    return flags


def _ci(interval) -> str:
    return f" (95% interval {interval[0]:.4f} to {interval[1]:.4f})" if interval else " (no interval: three sizes)"


def compute_optimal(fits: list[FamilyFit], budget: float) -> dict:
    """Each family's compute-optimal size for a training budget of ``budget`` FLOPs, from its L(N, D) (Chinchilla's
    approach 3): minimise E + A/N^alpha + B/D^beta with k N D = budget, where k is the family's own training FLOPs
    per parameter and token (measured on its runs: attention's and Mamba's costs per token differ from 6). In
    closed form N = (alpha A / (beta B))^(1/(alpha+beta)) (budget/k)^(beta/(alpha+beta)), D = budget / (k N)."""
    rows, without = [], []
    for f in fits:
        if f.nd is None or f.measure == "flops" or not all(p.flops > 0 for p in f.points):
            without.append(f.label)
            continue
        nd = f.nd
        k = float(np.median([p.flops / (p.size * p.tokens) for p in f.points]))
        n = (nd.alpha * nd.A / (nd.beta * nd.B)) ** (1 / (nd.alpha + nd.beta)) * (budget / k) ** (
            nd.beta / (nd.alpha + nd.beta))
        d = budget / (k * n)
        rows.append({"family": f.label, "params": float(n), "tokens": float(d), "tokens_per_param": float(d / n),
                     "loss": float(nd(n, d)), "flops_per_param_token": k})
    return {"budget": budget, "by_family": rows, "without_nd_law": without}


def compute_optimal_lines(optimal: dict) -> list[str]:
    """The compute-optimal sizes as sentences."""
    lines = [f"With {optimal['budget']:.3g} training FLOPs (each family's own FLOPs per parameter and token):"]
    for row in optimal["by_family"]:
        lines.append(f"- `{row['family']}`: {count_text(row['params'])} parameters on {count_text(row['tokens'])} "
                     f"tokens ({row['tokens_per_param']:.0f} per parameter), loss {row['loss']:.4f}")
    if optimal["without_nd_law"]:
        lines.append(f"- no L(N, D) for {', '.join(f'`{x}`' for x in optimal['without_nd_law'])}: it needs runs at "
                     "two or more token budgets (a ladder's `lengths`)")
    return lines


def prediction_lines(prediction: dict) -> list[str]:
    """The prediction as sentences, for the report and the console."""
    at = prediction["at"]
    measure = prediction["measure"]
    where = f"At {count_text(at, measure)} {unit(measure)}"
    if prediction.get("note"):
        return [f"{where}: {prediction['note']}."]
    lines = [f"{where}:"]
    for row in prediction["by_family"]:
        lines.append(f"- `{row['family']}`: loss {row['loss']:.4f}{_ci(row['interval'])}, "
                     f"{row['extrapolation']:.1f}x past its largest run")
    ref = prediction["reference"]
    for row in prediction["differences"]:
        share = (f"; lower than `{ref}` in {row['share_lower']:.0%} of resamples" if row["share_lower"] is not None
                 else "")
        cross = (f"; the curves cross at {', '.join(count_text(n, measure) for n in row['crossings'])} {unit(measure)}"
                 if row["crossings"] else "")
        lines.append(f"- `{row['family']}` minus `{ref}`: {row['difference']:+.4f}{_ci(row['interval'])}{share}{cross}")
    return lines


def plot(fits: list[FamilyFit], prediction: dict | None, path) -> None:
    """Final validation loss against size, a colour per family, each fitted law drawn out to the
    prediction's size with its interval there."""
    from hybrid_megatron.eval import plots

    fig, ax = plots.pyplot().subplots(figsize=(7, 4.8))
    every = [p.size for f in fits for p in f.points]
    right = max(max(every) * 3, prediction["at"] * 1.5 if prediction else 0)
    grid = np.exp(np.linspace(np.log(min(every) / 1.5), np.log(right), 200))
    at = {row["family"]: row for row in (prediction or {}).get("by_family", [])}
    for k, f in enumerate(fits):
        color = f"C{k % 10}"
        ax.plot([p.size for p in f.points], [p.final_val for p in f.points], "o", color=color, label=f.label)
        if f.law is not None:
            ax.plot(grid, f.law(grid), "--", color=color, lw=1, label=f"alpha {f.law.alpha:.3f}, E {f.law.E:.3f}")
        row = at.get(f.label)
        if row:
            low, high = row["interval"] or (row["loss"], row["loss"])
            ax.errorbar([prediction["at"]], [row["loss"]], yerr=[[row["loss"] - low], [high - row["loss"]]],
                        fmt="s", color=color, capsize=4)
    if prediction:
        ax.axvline(prediction["at"], color="grey", lw=0.8, alpha=0.6)
        ax.annotate(count_text(prediction["at"], fits[0].measure), (prediction["at"], 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel(unit(fits[0].measure))
    ax.set_ylabel("final validation loss")
    plots.save(fig, ax, path, legend_size=7)
