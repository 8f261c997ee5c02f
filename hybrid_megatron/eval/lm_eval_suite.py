"""The ``lm-eval`` suite: the checkpoint exported to Hugging Face (``convert to-hf``, into a temporary
directory) and EleutherAI's lm-evaluation-harness run on it through its ``hf`` model.

Tasks are the harness's own or defined in ``--task-dir`` (YAML files; the harness reads local data with
``dataset_path: json`` and ``dataset_kwargs.data_files``). Relative data-file paths in such a directory
resolve against it: the harness resolves them against the working directory, so the run happens from
inside it. No remote code is trusted (``trust_remote_code`` stays off); hub downloads are the harness's
business and fail without a network, so offline clusters use local tasks or a populated cache.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path

from data_pipeline.errors import ConfigError
from hybrid_megatron.eval.suites import EvalOptions

log = logging.getLogger(__name__)


def task_manager(task_dir: Path | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir.resolve()) if task_dir else None)


def check_tasks(tasks: list[str], manager) -> None:
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ConfigError(f"--tasks: unknown lm-eval task {unknown[0]!r} ({len(known)} tasks known; --task-dir "
                          "adds a directory of task YAMLs)")


def metrics_of(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from the harness's ``results`` block ("acc,none" -> "acc"; another filter than
    ``none`` keeps its name: "exact_match,strict-match")."""
    out = {}
    for task, values in results.items():
        row = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            row[metric if filt == "none" else key] = float(value)
        out[task] = row
    return out


def run_lm_eval(step_dir: Path, opts: EvalOptions, device: str) -> dict:
    """Exports ``step_dir`` and evaluates it on ``opts.tasks``; ``device``: "cuda" or "cpu"."""
    import lm_eval

    from hybrid_megatron.convert.to_hf import ExportOptions, export

    start = time.perf_counter()
    manager = task_manager(opts.task_dir)
    check_tasks(opts.tasks, manager)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    with tempfile.TemporaryDirectory(prefix="hm-lm-eval-") as tmp:
        hf_dir = Path(tmp) / "hf"
        export(step_dir, hf_dir, ExportOptions(dtype="bf16" if dtype == "bfloat16" else "fp32",
                                               progress=opts.progress))
        where = contextlib.chdir(opts.task_dir) if opts.task_dir else contextlib.nullcontext()
        with where:
            raw = lm_eval.simple_evaluate(
                model="hf", model_args={"pretrained": str(hf_dir), "dtype": dtype, "device": device,
                                        "trust_remote_code": False},
                tasks=list(opts.tasks), task_manager=manager, batch_size=opts.batch_size, limit=opts.limit,
                num_fewshot=opts.num_fewshot, log_samples=False)
    if raw is None:  # the harness returns None on non-zero ranks; this runs on one process
        raise RuntimeError("lm-eval returned no results")
    tasks = metrics_of(raw["results"])
    for task, row in tasks.items():
        log.info("lm-eval %s: %s", task, ", ".join(f"{k} {v:.4f}" for k, v in sorted(row.items())))
    return {"tasks": tasks, "samples": {t: raw.get("n-samples", {}).get(t, {}).get("effective") for t in tasks},
            "num_fewshot": raw.get("n-shot", {}), "limit": opts.limit, "dtype": dtype, "device": device,
            "lm_eval_version": raw.get("lm_eval_version"), "task_dir": str(opts.task_dir) if opts.task_dir else None,
            "seconds": round(time.perf_counter() - start, 2)}
