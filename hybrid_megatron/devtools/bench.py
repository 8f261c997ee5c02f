"""Shared pieces of the GPU training benchmarks: model sizes, run configs, FLOPs/MFU math, result JSON.

Everything here but ``measure_gemm_tflops``, ``init_single_gpu`` and ``peak_memory_gib`` runs on a CPU
(``tests/test_gpu_scripts_cpu.py`` checks it): the case registry, the RunConfig of each case, the rate
arithmetic and the incremental result writer.

Rates, as in ``hybrid_megatron.training.metrics``: tokens/s counts every input token of the timed steps
over their wall time; TFLOP/s/GPU = tokens/s x ``training_flops_per_token`` (our counter, recompute
excluded) / GPUs; MFU = that / the GPU's dense BF16 peak (989 TFLOP/s for H100/H200 SXM), also shown
as a ratio to a measured 8192^3 bf16 GEMM on the same GPU.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from hybrid_megatron.config import RunConfig
from hybrid_megatron.config_io import apply_overrides, build
from hybrid_megatron.model.build import padded_vocab_size
from hybrid_megatron.model.flops import num_parameters, training_flops_per_token
from hybrid_megatron.training.metrics import peak_tflops

SYNTHETIC_DATA_NOTE = (
    "synthetic tokens drawn uniformly from the vocabulary (throughput only; loss values are meaningless), the same "
    "batches for every path; unpacked rows (no cu_seqlens/seq_idx) unless settings.packed > 0: then documents of "
    "geometric lengths with that mean, each micro-batch in megatron's thd layout as pretrain trains"
)
VOCAB_SIZE = 32000  # a Llama-2-sized tokenizer: divisible by 128, so padded == vocab

_MAMBA = {"mamba_head_dim": 64, "mamba_num_groups": 8, "mamba_state_dim": 128, "mamba_conv_kernel": 4,
          "mamba_chunk_size": 128, "mamba_expand": 2}  # chunk/conv/expand = megatron's MambaMixer defaults
_COMMON = {"normalization": "RMSNorm", "activation": "squared_relu", "position_embedding_type": "none",
           "add_bias_linear": False, "vocab_size": VOCAB_SIZE, "layer_spec": "te"}

# Model sections (RunConfig.model). The stock path uses exactly these sizes: megatron's stock spec passes
# no mixer params, so chunk size, conv kernel and expand must stay at MambaMixer's defaults here.
MODELS: dict[str, dict] = {
    # 1 attention per 8 sequence mixers (7 Mamba-2 + 1 attention), each mixer followed by an MLP: 1.11B
    "hybrid1b": {"hybrid_layer_pattern": "M-M-M-M-M-M-M-*-" * 2, "hidden_size": 2048, "ffn_hidden_size": 8192,
                 "num_attention_heads": 16, "num_query_groups": 8, **_MAMBA, **_COMMON},
    # the same widths, attention only: 1.05B
    "attn1b": {"hybrid_layer_pattern": "*-" * 20, "hidden_size": 2048, "ffn_hidden_size": 8192,
               "num_attention_heads": 16, "num_query_groups": 8, **_MAMBA, **_COMMON},
    # Gated DeltaNet in place of Mamba-2 (Qwen3-Next's proportions: 16 key heads, 32 value heads of 128); SwiGLU
    # MLPs, since megatron's stock GatedDeltaNet takes its activation from the MLPs' and needs SiLU
    "gdn1b": {"hybrid_layer_pattern": "G-G-G-G-G-G-G-*-" * 2, "hidden_size": 2048, "ffn_hidden_size": 5632,
              "num_attention_heads": 16, "num_query_groups": 8, **_MAMBA, **{**_COMMON, "activation": "swiglu"}},
    # MoE in place of the MLPs of hybrid1b: 8 experts of 4096, top-2 (~1B active of ~2.3B)
    "moe1b": {"hybrid_layer_pattern": "MEMEMEMEMEMEME*E" * 2, "hidden_size": 2048, "ffn_hidden_size": 8192,
              "num_attention_heads": 16, "num_query_groups": 8, "moe_num_experts": 8, "moe_top_k": 2,
              "moe_ffn_hidden_size": 4096, **_MAMBA, **_COMMON},
    # a hybrid with attention in half its mixers, windowed (4096 tokens) but for the first, a middle and the
    # last attention layer (Hymba's global layers), and its full-attention twin
    "swa1b": {"hybrid_layer_pattern": "M-*-" * 8, "hidden_size": 2048, "ffn_hidden_size": 8192,
              "num_attention_heads": 16, "num_query_groups": 8, "attention_window": 4096,
              "global_attention_layers": [0, 3, 7], **_MAMBA, **_COMMON},
    "swafull1b": {"hybrid_layer_pattern": "M-*-" * 8, "hidden_size": 2048, "ffn_hidden_size": 8192,
                  "num_attention_heads": 16, "num_query_groups": 8, **_MAMBA, **_COMMON},
    # a few layers at Nemotron-H-8B widths (hidden 4096, 128 Mamba heads, FFN 21504): per-layer FP8 speed-up
    "hybrid7bl": {"hybrid_layer_pattern": "M-M-M-*-", "hidden_size": 4096, "ffn_hidden_size": 21504,
                  "num_attention_heads": 32, "num_query_groups": 8, **_MAMBA, **_COMMON},
}
PRECISIONS = ("bf16", "fp8")
PATHS = ("ours", "stock")
DEFAULT_CASES = [f"{m}-{p}-{path}" for m in ("hybrid1b", "attn1b") for p in PRECISIONS for path in PATHS]
PRESETS = {
    "default": DEFAULT_CASES,
    "fp8_7b": ["hybrid7bl-bf16-ours", "hybrid7bl-fp8-ours", "hybrid7bl-bf16-stock", "hybrid7bl-fp8-stock"],
    # the layer families against stock megatron-core built from the same pattern (run at --seq 4096 and 16384)
    "families": ["gdn1b-bf16-ours", "gdn1b-bf16-stock", "moe1b-bf16-ours", "moe1b-bf16-stock"],
    # sliding windows against full attention (run at --seq 16384 and 32768)
    "windows": ["swa1b-bf16-ours", "swafull1b-bf16-ours"],
}
MODEL_RATIOS = (  # (what, numerator model, denominator model): compared at the same precision, path and length
    ("hybrid / attention", "hybrid1b", "attn1b"),
    ("gdn hybrid / attention", "gdn1b", "attn1b"),
    ("gdn hybrid / mamba hybrid", "gdn1b", "hybrid1b"),
    ("window / full attention", "swa1b", "swafull1b"),
)
SCALING_SEQS = (2048, 4096, 8192, 16384)
SCALING_MODELS = ("hybrid1b", "attn1b")


@dataclass(frozen=True, slots=True)
class Case:
    model: str
    precision: str  # bf16 | fp8
    path: str  # ours | stock
    seq_len: int = 4096

    @property
    def name(self) -> str:
        return f"{self.model}-{self.precision}-{self.path}"


def parse_cases(text: str, seq_len: int = 4096) -> list[Case]:
    """``a-b-c,d-e-f`` or a preset name (``default``, ``fp8_7b``) -> cases; ValueError names a bad entry."""
    names: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        names.extend(PRESETS.get(item, [item]))
    cases = []
    for name in names:
        parts = name.split("-")
        if len(parts) != 3 or parts[0] not in MODELS or parts[1] not in PRECISIONS or parts[2] not in PATHS:
            raise ValueError(
                f"--cases: {name!r} is not MODEL-PRECISION-PATH with MODEL in {sorted(MODELS)}, PRECISION in "
                f"{list(PRECISIONS)}, PATH in {list(PATHS)} (or a preset: {sorted(PRESETS)})"
            )
        cases.append(Case(parts[0], parts[1], parts[2], seq_len))
    if not cases:
        raise ValueError("--cases: no case given")
    return cases


def run_config(model: str, precision: str, seq_len: int, micro_batch_size: int, global_batch: int,
               fp8_bf16_ends: int = 0, recompute: str = "none", overrides: tuple[str, ...] = (),
               packed: bool = False) -> RunConfig:
    """The RunConfig of a benchmark case (a synthetic data section: the loader is never built).

    ``overrides`` are ``section.key=value`` strings, as on the pretrain command line. ``packed``: documents
    reset attention and the Mamba state at their starts (megatron's ``thd`` layout, as pretrain trains).
    """
    if global_batch % micro_batch_size:
        raise ValueError(f"--global-batch {global_batch} is not a multiple of --micro-batch-size {micro_batch_size}")
    precision_section = {"dtype": "bf16", "fp32_ssm_params": True}
    if precision == "fp8":
        # Nemotron-H's recipe: hybrid format, per-tensor current scaling (tensorwise)
        precision_section.update(fp8="hybrid", fp8_recipe="tensorwise", fp8_bf16_layers_at_start=fp8_bf16_ends,
                                 fp8_bf16_layers_at_end=fp8_bf16_ends)
    elif precision != "bf16":
        raise ValueError(f"precision {precision!r}: must be one of {PRECISIONS}")
    raw = {
        "model": dict(MODELS[model]),
        "data": {"seed": 1, "global_batch_tokens": global_batch * seq_len, "seq_len": seq_len,
                 "sources": {"synthetic": "/nonexistent/synthetic"}, "batch_size_multiple": 1,
                 "phases": [{"name": "pretrain", "tokens": 10**12, "weights": {"synthetic": 1.0}}],
                 "reset_at_document_boundaries": packed},
        "precision": precision_section,
        "train": {"micro_batch_size": micro_batch_size, "train_steps": 10**6, "recompute": recompute},
        "schedule": {"lr_decay_style": "constant", "lr_warmup_steps": 0},
        "logging": {"tensorboard": False, "run_dir": "/tmp/hybrid_megatron_bench"},
    }
    return build(RunConfig, apply_overrides(raw, list(overrides)))


def model_numbers(cfg: RunConfig, seq_len: int) -> dict:
    """Parameter count and training FLOPs per token of a case (our counter), with the padded vocab."""
    padded = padded_vocab_size(cfg.model.vocab_size, cfg.model, cfg.parallel.tensor_model_parallel_size)
    return {"params": num_parameters(cfg.model, padded), "padded_vocab": padded,
            "flops_per_token": training_flops_per_token(cfg.model, padded, seq_len)}


def rates(tokens: int, seconds: float, flops_per_token: float, device_name: str, num_gpus: int = 1,
          gemm_tflops: float | None = None) -> dict:
    """tokens/s, TFLOP/s/GPU, MFU against the dense BF16 peak, and the ratio to a measured GEMM."""
    if seconds <= 0:
        raise ValueError(f"seconds={seconds}: must be > 0")
    tokens_per_s = tokens / seconds
    tflops = tokens_per_s * flops_per_token / num_gpus / 1e12
    peak = peak_tflops(device_name)
    return {
        "tokens_per_s": tokens_per_s,
        "tflops_per_gpu": tflops,
        "peak_bf16_tflops": peak,
        "mfu": tflops / peak if peak else None,
        "ratio_to_measured_gemm": tflops / gemm_tflops if gemm_tflops else None,
    }


# ---------------------------------------------------------------------------------------------------
# environment


def measure_gemm_tflops(n: int = 8192, iters: int = 30) -> float:
    """Dense bf16 [n, n] x [n, n] matmul throughput on the current GPU (TFLOP/s)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 * iters / seconds / 1e12


def init_single_gpu(seed: int = 1234) -> None:
    """One process, one GPU: NCCL world of one and megatron's parallel_state at TP=PP=1 (once per process)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not torch.cuda.is_available():
        raise RuntimeError("this benchmark needs a CUDA GPU (none visible)")
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
        torch.cuda.set_device(0)
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def peak_memory_gib(resident_bytes: int = 0) -> dict:
    """Peak memory since the last reset; ``resident_bytes`` (allocated when the case began: what earlier cases of an
    ``--in-process`` run left behind) is taken out of ``case_peak_gib``, the case's own peak."""
    import torch

    return memory_row(torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved(), resident_bytes)


def memory_row(max_allocated: int, max_reserved: int, resident: int) -> dict:
    return {"max_allocated_gib": max_allocated / 2**30, "max_reserved_gib": max_reserved / 2**30,
            "resident_at_start_gib": resident / 2**30, "case_peak_gib": (max_allocated - resident) / 2**30}


# ---------------------------------------------------------------------------------------------------
# results


class ResultFile:
    """A result JSON rewritten (temp file + rename) after every case, so a time-out keeps what finished."""

    def __init__(self, path: str | Path, header: dict):
        self.path = Path(path)
        self.data = {**header, "cases": []}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()

    def add(self, row: dict) -> None:
        self.data["cases"].append(row)
        self._write()

    def update(self, **fields) -> None:
        self.data.update(fields)
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def header(benchmark: str, argv: list[str], settings: dict) -> dict:
    return {"benchmark": benchmark, "command": " ".join(["python", *argv]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "data": SYNTHETIC_DATA_NOTE,
            "settings": settings}


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def combine_repeats(rows: list[dict]) -> list[dict]:
    """One row per case name from ``--repeats`` runs: the run with the median tokens/s (the lower one of
    an even count), with every run's tokens/s and their spread beside it; a case that never succeeded
    keeps its last error."""
    from statistics import median_low

    by_name: dict[str, list[dict]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    out = []
    for name, runs in by_name.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            out.append(runs[-1])
            continue
        rates_ = [r["tokens_per_s"] for r in ok]
        mid = median_low(rates_)
        row = dict(next(r for r in ok if r["tokens_per_s"] == mid))
        row.update(repeats=len(runs), failed_repeats=len(runs) - len(ok), tokens_per_s_all=rates_,
                   tokens_per_s_spread=(max(rates_) - min(rates_)) / mid if len(ok) > 1 else None)
        out.append(row)
    return out


def ratios(rows: list[dict]) -> list[tuple[str, str, str, float]]:
    """(what, numerator case, denominator case, tokens/s ratio) for the comparisons the issue asks for:
    ours/stock per model and precision, fp8/bf16 per model and path, hybrid/attention per sequence length."""
    ok = {(r["model"], r["precision"], r["path"], r["seq_len"]): r for r in rows if "error" not in r}
    out = []

    def add(what, a, b):
        if a in ok and b in ok:
            out.append((what, ok[a]["name"], ok[b]["name"], ok[a]["tokens_per_s"] / ok[b]["tokens_per_s"]))

    keys = sorted(ok)
    for model, prec, path, seq in keys:
        if path == "ours":
            add("ours / stock", (model, prec, "ours", seq), (model, prec, "stock", seq))
    for model, prec, path, seq in keys:
        if prec == "fp8":
            add("fp8 / bf16", (model, "fp8", path, seq), (model, "bf16", path, seq))
    for model, prec, path, seq in keys:
        for what, num, den in MODEL_RATIOS:
            if model == num:
                add(what, (num, prec, path, seq), (den, prec, path, seq))
    return out


_KERNEL_CATEGORIES = (  # first match wins; names are lower-cased kernel names
    ("mamba_ssd", ("chunk_scan", "chunk_state", "state_passing", "bmm_chunk", "chunk_cumsum", "ssd", "selective")),
    ("conv1d", ("causal_conv1d", "conv1d")),
    ("attention", ("flash", "fmha", "attn", "cudnn", "softmax")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "sm90_")),
    ("norm", ("norm",)),
    ("optimizer", ("adam", "multi_tensor", "l2norm")),
    # Transformer Engine's FP8 casts: only its own kernels (PyTorch's elementwise kernels carry "cast" in
    # their template names, e.g. gpu_kernel_impl_nocast, static_cast_with_inter_type)
    ("fp8_cast", ("transformer_engine::cast", "transformer_engine::detail::cast", "quantize", "amax",
                  "cast_transpose", "fp8")),
    ("copy", ("direct_copy", "copy_kernel", "transpose")),  # layout changes (.contiguous(), dtype copies)
    ("elementwise", ("elementwise", "vectorized", "reduce", "fill")),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    for category, needles in _KERNEL_CATEGORIES:
        if any(n in low for n in needles):
            return category
    return "other"


def device_kernel_times(averages) -> list[tuple[str, float, int]]:
    """[(kernel name, ms, calls)] from ``profiler.key_averages()``: GPU-side events only.

    CPU-side events carry device time too (an autograd function such as TE's ``_LayerNormLinearBackward``
    reports the kernels it launched through its C++ extension as its own), so summing every event counts
    those kernels twice and files GEMMs under the op's name.
    """
    from torch.autograd import DeviceType

    out = []
    for avg in averages:
        if getattr(avg, "device_type", None) != DeviceType.CUDA:
            continue
        us = getattr(avg, "self_device_time_total", None)
        if us is None:
            us = getattr(avg, "self_cuda_time_total", 0.0)
        if us and us > 0:
            out.append((avg.key, float(us) / 1e3, int(avg.count)))  # us -> ms
    return out


def summarize_kernels(kernels: list[tuple[str, float, int]], top: int = 15) -> dict:
    """[(kernel name, ms, calls)] of one profiled step -> total, ms and share by category, top kernels."""
    total = sum(ms for _, ms, _ in kernels) or 1e-9
    by_cat: dict[str, float] = {}
    for name, ms, _ in kernels:
        cat = kernel_category(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + ms
    ranked = sorted(kernels, key=lambda k: -k[1])[:top]
    return {
        "kernel_ms_total": total,
        "by_category_ms": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
        "by_category_share": {k: v / total for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:160], "ms": ms, "calls": c, "category": kernel_category(n)} for n, ms, c in ranked],
    }


def tokens_per_s(records: list[dict], skip: int = 5) -> float | None:
    """Input tokens per second (``losses.jsonl``'s ``input_tokens``: loss-masked ones included, as the training log
    counts them) over the steps after the first ``skip`` (start-up, compilation)."""
    timed = [r for r in records if "time" in r][skip:]
    if len(timed) < 2:
        return None
    return sum(r["input_tokens"] for r in timed[1:]) / max(timed[-1]["time"] - timed[0]["time"], 1e-9)
