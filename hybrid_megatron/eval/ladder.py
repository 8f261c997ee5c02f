"""A model ladder (``hybrid-megatron ladder SPEC --out DIR``): the runs that decide which architecture gets the
large run, planned on a CPU.

Every family of the spec (a layer-pattern unit, as ``compare`` groups runs) at every rung (a parameter target and
a depth): the unit is repeated to about the rung's depth and the width searched in steps of ``width_multiple``
for the valid config whose parameter count (the project's own counter) is nearest the target (the depth may
move by up to half where the widths the base's head proportions allow are too coarse), with the widths
that follow the hidden size (MLP and expert widths, attention heads at the base's head dim, query groups at the
base's heads per group) scaled with it. Each run trains ``tokens_per_param`` tokens per parameter (Chinchilla's
20 by default; OLMo's ladders also train 2x-10x of it): the base's data phases (and curriculum) are scaled to
that total, keeping their proportions; ``lengths`` trains every model at several multiples of that (for
L(N, D)), ``seeds`` repeats every run (for the run-to-run spread). What comes out is one resolved run config
per run, each with its own run directory, a table (``ladder.json``, ``ladder.md``) and the commands; after
training, ``compare --ladder DIR`` fits each family's law and sets them side by side.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.errors import ConfigError, DataError
from hybrid_megatron.config import RunConfig, load_yaml, run_config_from_dict
from hybrid_megatron.config_io import build, to_dict
from hybrid_megatron.eval.size_units import count_text, parse_size
from hybrid_megatron.model import pattern as pat
from hybrid_megatron.model.config import positive

MAX_HIDDEN = 32768
SIZE_TOLERANCE = 0.05  # a run within 5% of its parameter target counts as on target
_ROUND = 64  # widths that follow the hidden size are rounded to this (GEMM-friendly) multiple


@dataclass(kw_only=True, slots=True)
class Rung:
    size: str
    """Target parameters (total, the project's counter): 150M, 1.3B, 7e8."""
    layers: int
    """Depth to aim for: the unit is repeated round(layers / len(unit)) times (at least once)."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides for this rung's runs (a learning rate, a batch size)."""
    base: str | None = None
    """Another base config for this rung: the large run itself, planned with the family's unit on its own recipe
    (``configs/pretrain_7b.yaml``: its parallel layout, its pipeline segments, its data)."""
    tokens_per_param: float | None = None
    """This rung's tokens per parameter (the large run trains past the ladder's ratio)."""
    gpus: int | None = None
    """GPUs this rung's runs train on (default: the spec's, raised to the config's TP x PP x CP)."""


@dataclass(kw_only=True, slots=True)
class Family:
    unit: str
    """The layer-pattern block the family repeats (``M-M-M-*-``; no ``|``)."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides for this family's runs (Gated DeltaNet head dims, MoE experts)."""


@dataclass(kw_only=True, slots=True)
class LrScaling:
    reference: str
    """The parameter count at which the config's ``optim.lr`` holds (1B)."""
    exponent: float
    """lr = optim.lr * (N / reference)^exponent, and min_lr alike (-1/3 makes a 8x larger model train at half
    the LR)."""

    def __post_init__(self) -> None:
        parse_size(self.reference, "lr_scaling.reference")
        if not -2 <= self.exponent <= 0:
            raise ConfigError(f"lr_scaling.exponent={self.exponent}: in [-2, 0] (larger models train at lower LRs)")


@dataclass(kw_only=True, slots=True)
class LadderSpec:
    base: str
    """The run config every run starts from (relative to the working directory, as run configs' paths are)."""
    rungs: list[Rung]
    families: dict[str, Family]
    tokens_per_param: float = 20.0
    lengths: list[float] = field(default_factory=lambda: [1.0])
    """Run lengths in multiples of ``tokens_per_param`` (OLMo's 1xC, 2xC, 5xC): with two or more, every model
    trains at each, and ``compare`` fits L(N, D) per family."""
    seeds: list[int] = field(default_factory=list)
    """Replicates: every run once per seed (``train.seed`` and ``data.seed`` both), for the run-to-run spread;
    empty: once, at the base's seeds."""
    gpus: int = 1
    """GPUs each run trains on (at least its TP x PP x CP): the data-parallel size of the memory estimate."""
    gpu_memory_gib: float = 80.0
    """Memory of one GPU: runs the estimate puts above it are flagged (shrink train.micro_batch_size or add
    parallelism for them)."""
    width_multiple: int = 256
    overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides for every run."""
    lr_scaling: LrScaling | None = None
    """The learning rate as a power of the parameter count; None: every run at its config's LR (a rung's
    ``optim.lr`` override sets one by hand, and then this must stay None)."""

    def __post_init__(self) -> None:
        if not self.rungs or not self.families:
            raise ConfigError("a ladder needs at least one rung and one family")
        if self.tokens_per_param <= 0 or self.width_multiple < 8:
            raise ConfigError("tokens_per_param must be > 0 and width_multiple >= 8")
        if not self.lengths or any(x <= 0 for x in self.lengths) or len(set(self.lengths)) != len(self.lengths):
            raise ConfigError(f"lengths={self.lengths}: distinct multiples > 0 of tokens_per_param")
        if self.gpus < 1 or self.gpu_memory_gib <= 0:
            raise ConfigError(f"gpus={self.gpus}, gpu_memory_gib={self.gpu_memory_gib}: must be >= 1 and > 0")
        hand_set = [o for o in [*self.overrides, *(o for r in self.rungs for o in r.overrides),
                                *(o for f in self.families.values() for o in f.overrides)]
                    if o.partition("=")[0] in ("optim.lr", "optim.min_lr")]
        if self.lr_scaling is not None and hand_set:
            raise ConfigError(f"lr_scaling and the override {hand_set[0]!r} both set the learning rate: keep one")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={self.seeds}: each seed once")
        for name, family in self.families.items():
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ConfigError(f"families.{name}: a family name is letters, digits, '-' and '_' (it names files)")
            if pat.PIPE in family.unit:
                raise ConfigError(f"families.{name}.unit={family.unit!r}: a unit has no '|' cuts")
            pat.validate_pattern(family.unit)
        for k, rung in enumerate(self.rungs):
            parse_size(rung.size, f"rungs[{k}].size")
            if rung.layers < 1:
                raise ConfigError(f"rungs[{k}].layers={rung.layers}: must be >= 1")
            positive(f"rungs[{k}]", tokens_per_param=rung.tokens_per_param)
            if rung.gpus is not None and rung.gpus < 1:
                raise ConfigError(f"rungs[{k}].gpus={rung.gpus}: must be >= 1")


@dataclass(frozen=True, slots=True)
class Run:
    name: str
    family: str
    target: float
    config: RunConfig
    params: int
    tokens: int
    flops: float
    peak_gib: float  # the dry run's memory estimate of its fullest GPU
    gpus: int  # what the estimate assumes
    own_base: bool  # planned on a base of its own: the large run


def _scaled_model(base: dict, hidden: int, pattern: str) -> dict | None:
    """The base's model section at another width; None where the base's proportions do not divide."""
    model = dict(base)
    ratio = hidden / base["hidden_size"]
    model.update(hybrid_layer_pattern=pattern, hidden_size=hidden)

    def scaled(name: str) -> None:
        if model.get(name):
            model[name] = max(_ROUND, round(model[name] * ratio / _ROUND) * _ROUND)

    for name in ("ffn_hidden_size", "moe_ffn_hidden_size", "moe_shared_expert_size"):
        scaled(name)
    head_dim = base.get("kv_channels") or base["hidden_size"] // base["num_attention_heads"]
    if hidden % head_dim:
        return None
    model["num_attention_heads"] = hidden // head_dim
    if base.get("num_query_groups"):
        per_group = base["num_attention_heads"] // base["num_query_groups"]
        if model["num_attention_heads"] % per_group:
            return None
        model["num_query_groups"] = model["num_attention_heads"] // per_group
    for name in ("mamba_num_heads", "gdn_num_key_heads", "gdn_num_value_heads"):
        if model.get(name):
            if (model[name] * hidden) % base["hidden_size"]:
                return None
            model[name] = model[name] * hidden // base["hidden_size"]
    return model


def _scaled_data(data: dict, tokens: int) -> dict:
    """The data section training ``tokens`` in all: every phase (and the curriculum) scaled alike."""
    data = copy.deepcopy(data)
    total = sum(p["tokens"] for p in data["phases"])
    factor = tokens / total
    for phase in data["phases"]:
        phase["tokens"] = max(1, round(phase["tokens"] * factor))
    curriculum = data.get("curriculum")
    if isinstance(curriculum, dict):  # its token marks, scaled with the run
        if curriculum.get("total_tokens"):
            curriculum["total_tokens"] = max(1, round(curriculum["total_tokens"] * factor))
        curriculum["max_tokens"] = [max(1, round(t * factor)) for t in curriculum.get("max_tokens") or []]
    return data


def _vocab(cfg: RunConfig) -> int:
    """The vocabulary a run's parameters are counted with: the dry run's (the model's, else the data's, else the
    sample data's when pretrain builds it)."""
    from hybrid_megatron.training.dry_run import vocab

    try:
        return vocab(cfg)[0]
    except (ConfigError, DataError) as exc:
        raise ConfigError(f"the ladder needs the vocabulary: set model.vocab_size in its overrides, or prepare "
                          f"the base's data first ({exc})") from None


def _params(cfg: RunConfig, vocab: int) -> int:
    from hybrid_megatron.model.build import padded_vocab_size
    from hybrid_megatron.model.flops import num_parameters

    return num_parameters(cfg.model, padded_vocab_size(vocab, cfg.model, cfg.parallel.tensor_model_parallel_size))


def _fit(raw: dict, unit: str, layers: int, target: float, width_multiple: int,
         where: str) -> tuple[RunConfig, int, int]:
    """The valid config nearest ``target`` in parameters: the unit repeated to about ``layers`` (up to half again
    more or fewer, where the base's head proportions leave the widths too coarse to hit the target), the width
    searched in steps of ``width_multiple``; of the configs within ``SIZE_TOLERANCE`` of the target, the one of
    the depth nearest ``layers``. Returns the config, its parameters and the vocabulary they were counted with."""
    # a pipelined base keeps its number of segments (its stages, times its virtual chunks): the repeats come in
    # multiples of it, with a cut after each share; without pipelining no cut is needed
    pipelined = (raw.get("parallel") or {}).get("pipeline_model_parallel_size", 1) > 1
    segments = len(raw["model"]["hybrid_layer_pattern"].split(pat.PIPE)) if pipelined else 1
    aim = max(1, round(layers / len(unit)))
    best: tuple[tuple[float, int], RunConfig, int] | None = None
    last_error = vocab = None
    for repeats in range(max(1, aim // 2), aim + aim // 2 + 1):
        if repeats % segments:
            continue
        per_segment = unit * (repeats // segments)
        for hidden in range(width_multiple, MAX_HIDDEN + 1, width_multiple):
            model = _scaled_model(raw["model"], hidden, pat.PIPE.join([per_segment] * segments))
            if model is None:
                continue
            try:
                cfg = run_config_from_dict({**raw, "model": model})
            except ConfigError as exc:
                last_error = exc
                continue
            vocab = vocab or _vocab(cfg)  # the data's does not change with the width: read it once
            params = _params(cfg, vocab)
            # within SIZE_TOLERANCE of the target every config is as good on size: the depth nearest the rung's wins
            miss = abs(params - target) / target
            score = (max(0.0, miss - SIZE_TOLERANCE), abs(repeats - aim), miss)
            if best is None or score < best[0]:
                best = (score, cfg, params)
            if params > target:
                break
    if best is None:
        why = last_error or (f"no depth near it splits into the base's {segments} pipeline segments" if segments > 1
                             else "the base's heads do not divide")
        raise ConfigError(f"{where}: no width gives a valid config ({why})")
    if best[0][2] > 0.25:
        raise ConfigError(f"{where}: the nearest valid config has {count_text(best[2])} parameters for a target of "
                          f"{count_text(target)}; change the rung's layers or the base's head proportions")
    return best[1], best[2], vocab


def _load_base(path: str) -> dict:
    base = load_yaml(path)
    if isinstance(base.get("data"), str):
        base["data"] = load_yaml(base["data"])
    return base


def plan(spec: LadderSpec, out: Path) -> list[Run]:
    """Every (family, rung) run, its config resolved and validated; nothing is written."""
    from hybrid_megatron.config_io import apply_overrides
    from hybrid_megatron.model.build import padded_vocab_size
    from hybrid_megatron.model.flops import training_flops_per_token
    from hybrid_megatron.training.dry_run import peak_memory_bytes

    bases = {path: _load_base(path) for path in {spec.base, *(r.base for r in spec.rungs if r.base)}}
    runs = []
    for family_name, family in spec.families.items():
        for rung in spec.rungs:
            model_name = f"{family_name}-{rung.size}"
            where = f"{model_name} (unit {family.unit!r}, {rung.layers} layers)"
            raw = apply_overrides(copy.deepcopy(bases[rung.base or spec.base]),
                                  [*spec.overrides, *family.overrides, *rung.overrides])
            target = parse_size(rung.size)
            cfg, params, vocab = _fit(raw, family.unit, rung.layers, target, spec.width_multiple, where)
            if spec.lr_scaling is not None:
                factor = (params / parse_size(spec.lr_scaling.reference)) ** spec.lr_scaling.exponent
                cfg = build(RunConfig, {**to_dict(cfg), "optim": {**to_dict(cfg.optim), "lr": cfg.optim.lr * factor,
                                                                  "min_lr": cfg.optim.min_lr * factor}})
            for length in spec.lengths:
                for seed in spec.seeds or [None]:
                    name = model_name + (f"-{length:g}xC" if len(spec.lengths) > 1 else "")
                    name += f"-s{seed}" if seed is not None else ""
                    tokens = round((rung.tokens_per_param or spec.tokens_per_param) * length * params)
                    run_dir = out / "runs" / name
                    raw = {**to_dict(cfg), "data": _scaled_data(to_dict(cfg.data), tokens)}
                    raw["logging"] = {**raw["logging"], "run_dir": str(run_dir)}
                    raw["checkpoint"] = {**raw["checkpoint"], "save_dir": str(run_dir / "checkpoints")}
                    if seed is not None:
                        raw["train"] = {**raw["train"], "seed": seed}
                        raw["data"]["seed"] = seed
                    run = build(RunConfig, raw)
                    # FLOPs at the longest sequence trained (a curriculum's shorter early steps cost a little less)
                    padded = padded_vocab_size(vocab, run.model, run.parallel.tensor_model_parallel_size)
                    flops = float(tokens) * training_flops_per_token(run.model, padded, run.data.longest_seq_len)
                    par = run.parallel
                    model_parallel = (par.tensor_model_parallel_size * par.pipeline_model_parallel_size
                                      * par.context_parallel_size)
                    gpus = rung.gpus or -(-spec.gpus // model_parallel) * model_parallel
                    try:
                        peak = peak_memory_bytes(run, world_size=gpus) / 2**30
                    except ConfigError as exc:
                        raise ConfigError(f"{name}: {exc}".replace("--gpus", "gpus")) from None
                    runs.append(Run(name, family_name, target, run, params, tokens, flops, peak, gpus,
                                    rung.base is not None))
    return runs


def write(runs: list[Run], spec: LadderSpec, spec_path: str, out: Path) -> dict:
    """``out/configs/<run>.yaml``, ``out/ladder.json`` and ``out/ladder.md`` (the table and the commands)."""
    import yaml

    (out / "configs").mkdir(parents=True, exist_ok=True)
    rows = []
    for r in runs:
        path = out / "configs" / f"{r.name}.yaml"
        path.write_text(yaml.safe_dump(to_dict(r.config), sort_keys=False))
        m = r.config.model
        rows.append({"run": r.name, "family": r.family, "config": str(path), "target": r.target, "params": r.params,
                     "pattern": m.hybrid_layer_pattern, "layers": len(pat.layers(m.hybrid_layer_pattern)),
                     "hidden_size": m.hidden_size, "tokens": r.tokens, "training_flops": r.flops,
                     "lr": r.config.optim.lr, "gpus": r.gpus, "peak_gib": r.peak_gib, "over_memory": r.peak_gib > spec.gpu_memory_gib,
                     "run_dir": r.config.logging.run_dir})
    by_family: dict[str, list[str]] = {}
    for r in rows:
        by_family.setdefault(r["family"], []).append(r["run_dir"])
    # the families named as the spec names them (compare's own rule would label them by pattern unit)
    labels = " ".join(f"--family {name}={','.join(dirs)}" for name, dirs in by_family.items())
    # read the laws at the large run a rung of its own base plans, else at 7B
    large = [r for r in runs if r.own_base]
    at = float(max(r.params for r in large)) if large else 7e9
    # with several lengths compare fits L(N, D): then the large run's FLOPs say what size they buy best
    budget = float(max(r.flops for r in large)) if large and len(spec.lengths) > 1 else None
    summary = {"spec": spec_path, "gpu_memory_gib": spec.gpu_memory_gib, "predict": at, "budget": budget, "runs": rows,
               "compare": f"hybrid-megatron compare --ladder {out}",
               "compare_explicit": f"hybrid-megatron compare {out}/runs/* --out {out}/compare --predict "
                                   f"{count_text(at)} --partial" + (f" --budget {budget:.3g}" if budget else "")
                                   + f" {labels}"}
    (out / "ladder.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# Ladder from {spec_path}", "",
             f"Memory: the dry run's estimate of a run's fullest GPU on its GPUs; **over** marks runs above "
             f"{spec.gpu_memory_gib:g} GiB.", "",
             "| run | layers | hidden | parameters (target) | tokens | training FLOPs | LR | GPUs | memory per GPU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['run']} | {r['layers']} | {r['hidden_size']} | {count_text(r['params'])} ({count_text(r['target'])}) "
              f"| {count_text(r['tokens'])} | {r['training_flops']:.3g} | {r['lr']:.3g} | {r['gpus']} "
              f"| {r['peak_gib']:.1f} GiB"
              f"{' **over**' if r['over_memory'] else ''} |" for r in rows]
    lines += ["", "Train each on one GPU:", "", "```bash"]
    lines += [f"hybrid-megatron pretrain {r['config']}" for r in rows]
    lines += ["```", "", "or as one SLURM job each (set the nodes per size; the script's header lists its settings):", "",
              "```bash", f"for c in {out}/configs/*.yaml; do CONFIG=$c RUN_DIR={out}/runs/$(basename $c .yaml) "
              "sbatch --nodes=1 slurm/pretrain_7b.sh; done", "```", "",
              "evaluate each finished run on GPUs (its final checkpoint; add suites and tasks as needed):", "",
              "```bash", f"for r in {out}/runs/*; do hybrid-megatron eval $r/checkpoints --suite ppl,length; done",
              "```", "", "then fit and compare the families (the runs not started are left out):", "", "```bash",
              summary["compare"], "```", "", "which is", "", "```bash", summary["compare_explicit"], "```", ""]
    (out / "ladder.md").write_text("\n".join(lines))
    return summary


def read_plan(out: str | Path) -> dict:
    """``out/ladder.json`` as ``write`` left it: what ``compare --ladder`` compares."""
    path = Path(out) / "ladder.json"
    try:
        plan = json.loads(path.read_text())
        runs = [(str(r["run_dir"]), str(r["family"])) for r in plan["runs"]]
        budget = plan.get("budget")
        return {"runs": runs, "predict": float(plan["predict"]), "budget": float(budget) if budget else None}
    except FileNotFoundError:
        raise ConfigError(f"{out}: no ladder.json (plan the ladder there first: hybrid-megatron ladder SPEC --out "
                          f"{out})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not the plan `ladder` writes ({type(exc).__name__}: {exc})") from None


def load_spec(path: str) -> LadderSpec:
    return build(LadderSpec, load_yaml(path))

