"""``hybrid-megatron eval CKPT``: checks first (one line each, before any GPU work), then the megatron
suites on every rank at the process layout, then ``lm-eval`` on rank 0, then the report.

Layout: one process evaluates at TP = PP = 1 unless ``parallel.*`` overrides say otherwise (a checkpoint
reloads at any layout); several processes (torchrun or srun) use the layout the checkpoint was trained at
unless overridden. Output: ``--out``, by default ``<run dir>/eval/<step dir>`` when the checkpoint sits in
a run directory that ``pretrain`` wrote (where ``compare`` finds it).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from data_pipeline.errors import ConfigError
from data_pipeline.loader import TokenizerInfo
from hybrid_megatron.checkpoint import layout
from hybrid_megatron.config import RunConfig
from hybrid_megatron.eval import report
from hybrid_megatron.eval.suites import EvalOptions, check_options, megatron_suites, needs_validation

log = logging.getLogger(__name__)
_SINGLE_PROCESS_LAYOUT = ("parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1")


def default_out(step_dir: Path, kind: str = "eval") -> Path:
    """``<run dir>/<kind>/<step dir>``: where ``eval`` (and ``inspect``) write for a checkpoint of a run."""
    run_dir = step_dir.parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{step_dir} is not inside a run directory written by pretrain: pass --out DIR")
    return run_dir / kind / step_dir.name


def resolve(checkpoint: str, overrides: list[str], opts: EvalOptions, world_size: int,
            base: RunConfig | None = None) -> tuple[Path, RunConfig]:
    """The step dir and the config to evaluate with; every option and config check that needs no GPU."""
    from hybrid_megatron.training.inference import run_config_of_checkpoint

    check_options(opts)
    layout_given = any(o.startswith("parallel.") for o in overrides)
    defaults = list(_SINGLE_PROCESS_LAYOUT) if world_size == 1 and not layout_given else []
    step_dir, cfg = run_config_of_checkpoint(checkpoint, defaults + list(overrides), base)
    wanting = needs_validation(opts)
    if wanting and cfg.data.validation is None:
        raise ConfigError(f"--suite {','.join(wanting)} needs validation data, and the data config of {step_dir} has "
                          "no data.validation section: add one with an override such as data=PATH, or make one "
                          "with prepare-data --holdout-fraction")
    if "lm-eval" in opts.suites:
        check_hf_cuda(cfg)
    if {"mqar", "state"} & set(opts.suites):
        from hybrid_megatron.eval.recall_suites import grid

        grid(cfg, opts)
    if {"niah", "generation"} & set(opts.suites):
        data_tokenizer(step_dir, cfg)
    return step_dir, cfg


def data_tokenizer(step_dir: Path, cfg: RunConfig):
    """The tokenizer of the run's data (the checkpoint's record, else the training sources'), to write the
    niah needle and question and to show generated text."""
    from data_pipeline.loader import open_sources, tokenizer_info
    from data_pipeline.tokenizer import load_tokenizer

    info = layout.read_data_tokenizer(step_dir) or tokenizer_info(open_sources(cfg.data)).tokenizer
    if info.get("kind") == "bytes":
        return load_tokenizer("bytes")
    path = info.get("path")
    if info.get("kind") != "hf" or not path or not Path(path).is_dir():
        raise ConfigError(f"--suite niah/generation needs the data's tokenizer: {info.get('kind')} tokenizer "
                          f"{path or ''} is not available here")
    tok = load_tokenizer(path)
    if tok.describe()["fingerprint"] != info.get("fingerprint"):
        raise ConfigError(f"the data's tokenizer at {path} changed since training (its fingerprint differs)")
    return tok


def check_hf_cuda(cfg: RunConfig) -> None:
    """lm-eval runs the exported model on the GPU, where causal-conv1d is installed: refuse before any work a
    model transformers' CUDA path cannot run (and one that cannot be exported at all)."""
    import importlib.util

    from hybrid_megatron.convert.checks import check_exportable, hf_cuda_conv_problem

    check_exportable(cfg.model)
    problem = hf_cuda_conv_problem(cfg.model)
    if problem and importlib.util.find_spec("causal_conv1d") is not None:
        raise ConfigError(f"--suite lm-eval: {problem}")


def recorded_tokenizer(step_dir: Path) -> TokenizerInfo | None:
    """The tokenizer of the run's data as the checkpoint records it (then the training sources need not be
    present to check that the validation data matches the model)."""
    info = layout.read_data_tokenizer(step_dir)
    if not info or "eos_id" not in info or "fingerprint" not in info:
        return None
    return TokenizerInfo(int(info["vocab_size"]), int(info["eos_id"]), info)


def evaluate(step_dir: Path, cfg: RunConfig, opts: EvalOptions, out: Path) -> dict | None:
    """Runs the suites; rank 0 writes and returns the results (other ranks return None)."""
    from hybrid_megatron.training.distributed import discover_ranks, require_gpu

    require_gpu("eval", hint="")
    start = time.perf_counter()
    results = {"checkpoint": str(step_dir), "step": int(step_dir.name.split("-")[1]),
               "pattern": cfg.model.hybrid_layer_pattern, "suites": {}}
    rank = discover_ranks().rank
    if megatron_suites(opts):
        results.update(_megatron_part(step_dir, cfg, opts))
    else:
        results.update(_model_facts(step_dir, cfg, world_size=1))
    if rank != 0:
        return None
    if "lm-eval" in opts.suites:
        from hybrid_megatron.eval.lm_eval_suite import run_lm_eval

        results["suites"]["lm-eval"] = run_lm_eval(step_dir, opts, "cuda")
    results["suites"] = {name: results["suites"][name] for name in opts.suites}  # the order asked for
    results["seconds"] = round(time.perf_counter() - start, 2)
    from hybrid_megatron.training.environment import device_name, versions

    results["device"], results["versions"] = device_name(), versions()
    report.write(results, out)
    log.info("eval results: %s", out / report.RESULTS)
    return results


def _model_facts(step_dir: Path, cfg: RunConfig, world_size: int) -> dict:
    from hybrid_megatron.model.build import padded_vocab_size
    from hybrid_megatron.model.flops import num_parameters
    from hybrid_megatron.model.memory import data_parallel_size
    from hybrid_megatron.training.inference import checkpoint_vocab_size

    par = cfg.parallel
    padded = padded_vocab_size(checkpoint_vocab_size(cfg, step_dir), cfg.model, par.tensor_model_parallel_size)
    dp = data_parallel_size(cfg, world_size, what="world size")
    return {"params": num_parameters(cfg.model, padded),
            "layout": {"tp": par.tensor_model_parallel_size, "pp": par.pipeline_model_parallel_size, "dp": dp}}


def _megatron_part(step_dir: Path, cfg: RunConfig, opts: EvalOptions) -> dict:
    """Process groups, the model and every suite that runs through it; every rank takes part and gets the same
    dict."""
    import torch
    from tqdm import tqdm

    from hybrid_megatron.eval import megatron_suites as ms
    from hybrid_megatron.eval import recall_suites
    from hybrid_megatron.training import distributed
    from hybrid_megatron.training.inference import load_model_for_inference
    from hybrid_megatron.training.setup import ensure_data

    ranks = distributed.initialize(cfg)
    try:
        ensure_data(cfg, ranks.rank)
        model = load_model_for_inference(cfg, step_dir, max_seq_len=ms.model_max_length(cfg, opts))
        tokenizer = recorded_tokenizer(step_dir)
        out = {**_model_facts(step_dir, cfg, ranks.world_size), "suites": {}}
        bar = tqdm(unit="tok", unit_scale=True, desc="eval", disable=not opts.progress or ranks.rank != 0,
                   total=None)  # each suite adds what it will read
        with bar:
            if "ppl" in opts.suites:
                out["suites"]["ppl"] = ms.run_ppl(model.chunks, cfg, tokenizer, bar)
            if "length" in opts.suites:
                out["suites"]["length"] = ms.run_length(model.chunks, cfg, opts, tokenizer, bar)
            full = None
            if "mqar" in opts.suites:
                out["suites"]["mqar"], full = recall_suites.run_mqar(model.chunks, cfg, opts, model.vocab_size, bar)
            if "state" in opts.suites:
                out["suites"]["state"] = recall_suites.run_state(model.chunks, cfg, opts, model.vocab_size, bar,
                                                                 full=full)
            if {"niah", "generation"} & set(opts.suites):
                from data_pipeline.loader import open_validation_sources
                from hybrid_megatron.eval import text_suites

                tok, indexes = data_tokenizer(step_dir, cfg), open_validation_sources(cfg.data)
                if "niah" in opts.suites:
                    out["suites"]["niah"] = text_suites.run_niah(model.chunks, cfg, opts, tok, indexes,
                                                                 model.vocab_size, bar)
                if "generation" in opts.suites:
                    out["suites"]["generation"] = text_suites.run_generation(model.chunks, cfg, opts, tok, indexes,
                                                                             model.vocab_size, bar)
        del model
        torch.cuda.empty_cache()
        return out
    finally:
        distributed.shutdown()
