"""Record conversion-parity fixtures on the GPU machine: tiny trained checkpoints + megatron's own logits.

    python tools/make_convert_fixtures.py [--fixtures tp1,tp2,pp2] [--out tests/fixtures/convert]

For each fixture (``tp1``: one GPU; ``tp2``: TP=2 and ``pp2``: PP=2 with an uneven ``|`` split, two GPUs
each; skipped when fewer GPUs are visible) this driver, which never touches CUDA itself:

1. trains a tiny fp32 hybrid (pattern ``M-*|M-M-``: Mamba-2, attention, MLP; chunk 64) for ``--steps``
   steps on the sample data through the real CLI (``python -m hybrid_megatron pretrain configs/tiny.yaml
   <overrides>``, under ``torch.distributed.run`` for two GPUs). Should that fail, it says why and trains
   with the same components in a worker process instead (``trained_by`` in meta.json says which ran);
2. in a worker at the fixture's TP/PP layout: builds a fresh megatron model, loads the trained weights
   (dist_checkpointing, model part only), saves them as a model-only torch_dist checkpoint
   ``<out>/<name>/ckpt/`` (``step-000000`` + ``latest``, ``run_config.yaml`` with the model section,
   ``train_state.json`` = ``{"weights_only": true, "step": 0}``: what ``convert from-hf`` writes), builds
   another fresh model from that checkpoint and records, in eval mode and strict fp32, ``reference.pt``:

       input_ids   LongTensor [2, 150]        two windows of the sample ``docs`` source (150 > 2 chunks of 64)
       logits      float32    [2, 150, 264]   megatron's logits, gathered over TP, padded vocab included
       greedy_ids  LongTensor [2, 70 + 20]    prompt input_ids[:, :70] + 20 greedy tokens by full forwards
                                              (no cache), argmax over the first vocab_size=257 columns
       prompt_len  int                        70

   plus ``meta.json`` (layout, steps, losses, versions). See tests/test_convert_parity.py for the contract.

   Strict fp32 (``reference_precision: "fp32"``): Transformer Engine runs every fp32 GEMM as TF32
   (cuBLASLt ``CUBLAS_COMPUTE_32F_FAST_TF32``, not configurable) and Triton's ``tl.dot`` defaults to TF32
   (the Mamba-2 SSD kernels), which puts ~5e-4 of the logit scale between megatron's "fp32" logits and a
   true fp32 forward. The reference therefore comes from the same checkpoint loaded into megatron's
   local-spec model (its norms map onto the TE keys), with TF32 off in torch and cuDNN,
   ``TRITON_F32_DEFAULT=ieee`` (and a fresh Triton cache, whose key ignores that setting), and SDPA's
   math kernel. The TE model's logits are compared with it and recorded in meta.json
   (``te_tf32_max_abs_diff``). ``--reference te`` records the TE logits instead
   (``reference_precision: "tf32"``).
   The fixture's tensor keys carry no wrapper prefix (as ``convert from-hf`` writes and ``convert to-hf``
   reads), as do training saves (taken below the DDP wrapper). Checkpoints written before that carry
   ``module.`` (megatron's DDP child name) and still load here; meta.json records the prefix the trained
   checkpoint had (``source_key_prefix``, expected empty).
3. checks each fixture (contract, ``latest``, size) and prints a table; ``--summary`` gets a JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from _gpu_launch import device_name, launch, visible_gpus

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout

BATCH, SEQ, PROMPT_LEN, NEW_TOKENS = 2, 150, 70, 20
WINDOW_STRIDE = 997  # token offset between the two input rows inside the source stream
STEP_DIR = "step-000000"
MAX_FIXTURE_BYTES = 1_600_000  # three fixtures stay well under the 5 MB budget
FIXTURES = {  # name -> layout; the pattern is cut for PP=2 into 3 + 4 layers (an uneven split)
    "tp1": {"tp": 1, "pp": 1},
    "tp2": {"tp": 2, "pp": 1},
    "pp2": {"tp": 1, "pp": 2},
}
MODEL = {  # ~0.18M parameters: hidden 64, 4 Mamba heads of 32 (2 groups, state 16), 4 attention heads (2 KV)
    "hybrid_layer_pattern": "M-*|M-M-",
    "hidden_size": 64,
    "ffn_hidden_size": 128,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "mamba_head_dim": 32,
    "mamba_num_groups": 2,
    "mamba_state_dim": 16,
    "mamba_chunk_size": 64,
    "vocab_size": 257,  # the bytes tokenizer of the sample data
    "make_vocab_size_divisible_by": 8,  # 264 rows: small logits, divisible by TP=2
    "layer_spec": "te",
}


def nproc(name: str) -> int:
    return FIXTURES[name]["tp"] * FIXTURES[name]["pp"]


def overrides(name: str, run_dir: Path, steps: int, layout: dict | None = None) -> list[str]:
    """Dotlist overrides of configs/tiny.yaml for a fixture (``layout`` replaces the fixture's TP/PP)."""
    layout = layout or FIXTURES[name]
    out = [f"model.{k}={v}" for k, v in MODEL.items()]
    out += [
        "precision.dtype=fp32",
        # TE runs fp32 attention only through its unfused backend, which has no packed (thd) path
        "data.reset_at_document_boundaries=false",
        f"parallel.tensor_model_parallel_size={layout['tp']}",
        f"parallel.pipeline_model_parallel_size={layout['pp']}",
        f"train.train_steps={steps}",
        f"schedule.lr_warmup_steps={max(1, steps // 6)}",
        "logging.log_interval=10",
        "logging.tensorboard=false",
        f"logging.run_dir={run_dir}",
    ]
    return out


def load_config(name: str, run_dir: Path, steps: int, layout: dict | None = None):
    from hybrid_megatron.config import load_run_config

    return load_run_config(ROOT / "configs" / "tiny.yaml", overrides(name, run_dir, steps, layout))


def windows_from_tokens(tokens, batch: int = BATCH, seq: int = SEQ, stride: int = WINDOW_STRIDE):
    """Rows ``tokens[i*stride : i*stride + seq]`` as a LongTensor [batch, seq]."""
    import numpy as np
    import torch

    need = (batch - 1) * stride + seq
    if len(tokens) < need:
        raise ValueError(f"need {need} tokens for {batch} windows of {seq}, the source gave {len(tokens)}")
    rows = [np.asarray(tokens[i * stride: i * stride + seq], dtype=np.int64) for i in range(batch)]
    return torch.from_numpy(np.stack(rows))


def sample_tokens(source_dir: Path, count: int):
    """The first ``count`` tokens of a prepare-data source (members in index order)."""
    import numpy as np

    from data_pipeline.shards import MemberReader, SourceIndex

    reader = MemberReader(SourceIndex.open(source_dir))
    parts, have = [], 0
    try:
        for member in range(reader.index.num_members):
            parts.append(np.array(reader.read(member)))
            have += len(parts[-1])
            if have >= count:
                break
    finally:
        reader.close()
    return np.concatenate(parts)[:count]


def check_reference(ref: dict, vocab_size: int, padded_vocab: int, chunk_size: int) -> None:
    """Raises ValueError where ``ref`` breaks the fixture contract of tests/test_convert_parity.py."""
    import torch

    missing = {"input_ids", "logits", "greedy_ids", "prompt_len"} - set(ref)
    if missing:
        raise ValueError(f"reference lacks {sorted(missing)}")
    ids, logits, greedy, p = ref["input_ids"], ref["logits"], ref["greedy_ids"], ref["prompt_len"]
    if ids.dtype != torch.long or ids.dim() != 2:
        raise ValueError(f"input_ids must be a 2-D LongTensor, got {ids.dtype} {tuple(ids.shape)}")
    b, s = ids.shape
    if not (s > chunk_size and s % chunk_size):
        raise ValueError(f"S={s} must exceed and not be a multiple of mamba_chunk_size={chunk_size}")
    if logits.dtype != torch.float32 or tuple(logits.shape) != (b, s, padded_vocab):
        raise ValueError(f"logits must be float32 [{b}, {s}, {padded_vocab}], got {logits.dtype} {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits hold non-finite values")
    if not isinstance(p, int) or not 0 < p <= s:
        raise ValueError(f"prompt_len={p!r} must be an int in (0, {s}]")
    if greedy.dtype != torch.long or tuple(greedy.shape) != (b, p + NEW_TOKENS):
        raise ValueError(f"greedy_ids must be a LongTensor [{b}, {p + NEW_TOKENS}], got {tuple(greedy.shape)}")
    if not torch.equal(greedy[:, :p], ids[:, :p]):
        raise ValueError("greedy_ids does not start with the prompt input_ids[:, :prompt_len]")
    if int(greedy[:, p:].max()) >= vocab_size or int(ids.max()) >= vocab_size:
        raise ValueError(f"token ids must be < vocab_size={vocab_size}")


def write_reference(path: Path, input_ids, logits, greedy_ids, prompt_len: int) -> None:
    import torch

    ref = {"input_ids": input_ids.cpu().long().contiguous(), "logits": logits.cpu().float().contiguous(),
           "greedy_ids": greedy_ids.cpu().long().contiguous(), "prompt_len": int(prompt_len)}
    torch.save(ref, path)


def check_fixture(root: Path, max_bytes: int = MAX_FIXTURE_BYTES) -> dict:
    """Contract + checkpoint layout + size of ``root`` (CPU only); returns sizes."""
    import torch

    from hybrid_megatron.convert import ckpt_io
    from hybrid_megatron.model.build import padded_vocab_size

    step_dir = ckpt_io.resolve_step_dir(root / "ckpt")
    model = ckpt_io.load_model_config(step_dir)
    state = json.loads((step_dir / ckpt_io.TRAIN_STATE).read_text())
    if state != {"weights_only": True, "step": 0}:
        raise ValueError(f"{step_dir}/train_state.json is {state}, expected weights_only at step 0")
    steps = [p.name for p in (root / "ckpt").iterdir() if p.is_dir()]
    if steps != [step_dir.name]:
        raise ValueError(f"{root}/ckpt holds {steps}: exactly one step dir expected")
    ref = torch.load(root / "reference.pt", weights_only=True)
    check_reference(ref, model.vocab_size, padded_vocab_size(model.vocab_size, model, 1), model.mamba_chunk_size)
    sizes = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    total = sum(sizes.values())
    if total > max_bytes:
        raise ValueError(f"{root} is {total:,} bytes, over the {max_bytes:,}-byte budget per fixture")
    return {"bytes": total, "files": len(sizes), "ckpt_bytes": sum(v for k, v in sizes.items() if k.startswith("ckpt"))}


# ---------------------------------------------------------------------------------------------------
# workers (GPU, one process per rank)


def _rank0() -> bool:
    import torch

    return torch.distributed.get_rank() == 0


EMBEDDING_KEY = "embedding.word_embeddings.weight"


def key_prefix(keys) -> str:
    """The wrapper prefix of a checkpoint's model keys: '' (training saves, model-only saves, ``convert
    from-hf``) or 'module.' (training saves of earlier versions, taken through megatron's DDP wrapper)."""
    found = {k[: -len(EMBEDDING_KEY)] for k in keys if k.endswith(EMBEDDING_KEY) and not k.startswith("optimizer")}
    found &= {"", "module.", "module.module."}
    if len(found) != 1:
        raise RuntimeError(f"cannot tell the model key prefix of the checkpoint (candidates {sorted(found)})")
    return found.pop()


def _load_weights(model, step_dir: Path) -> str:
    """Model tensors of a torch_dist checkpoint (a training save or a model-only one) into a bare model;
    returns the key prefix the checkpoint used."""
    import torch.distributed.checkpoint as dcp
    from megatron.core import dist_checkpointing

    prefix = key_prefix(dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict(prefix=prefix)}, str(step_dir))
    weights = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in loaded["model"].items()}
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"{step_dir} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return prefix


def _save_model_only(model, cfg, save_dir: Path) -> Path:
    """Model-only torch_dist save at this process layout, laid out like ``convert from-hf`` output."""
    import torch
    from megatron.core import dist_checkpointing

    from hybrid_megatron.config_io import to_dict
    from hybrid_megatron.convert import ckpt_io

    step_dir = save_dir / STEP_DIR
    if _rank0():
        shutil.rmtree(save_dir, ignore_errors=True)
        step_dir.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(step_dir))
    torch.distributed.barrier()  # every rank's shards are written before the pointer
    if _rank0():
        ckpt_io.write_step_files(step_dir, to_dict(cfg.model), {"weights_only": True, "step": 0})
        ckpt_io.point_latest(save_dir, step_dir)
    torch.distributed.barrier()
    return step_dir


def _fresh_model(cfg):
    from hybrid_megatron.model.build import build_model_chunks

    chunks = build_model_chunks(cfg, cfg.model.vocab_size, max(SEQ, PROMPT_LEN + NEW_TOKENS))
    if len(chunks) != 1:
        raise RuntimeError(f"fixtures use one model chunk per rank, got {len(chunks)} (virtual pipeline stages)")
    return chunks[0].eval()


def forward_logits(model, ids_BS, padded_vocab: int):
    """megatron's forward (through its pipeline schedule) -> full-vocab logits [B, S, V] on every rank."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = ids_BS.shape
    pos = torch.arange(s, device=ids_BS.device).unsqueeze(0).expand(b, s).contiguous()

    def step(data_iterator, m):
        # runtime_gather_output: the output layer all-gathers the vocab-parallel logits over TP
        return m(next(data_iterator), pos, attention_mask=None, runtime_gather_output=True), None

    with torch.no_grad():
        out = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([ids_BS]), model=[model],
                                          num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        logits = out[0].float().contiguous()
        if tuple(logits.shape) != (b, s, padded_vocab):
            raise RuntimeError(f"megatron returned logits of shape {tuple(logits.shape)}, expected {(b, s, padded_vocab)}")
    else:
        logits = torch.empty(b, s, padded_vocab, device=ids_BS.device, dtype=torch.float32)
    # the last pipeline stage holds the logits: share them along the pipeline
    torch.distributed.broadcast(logits, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                group=parallel_state.get_pipeline_model_parallel_group())
    return logits


def greedy(model, prompt_BP, new_tokens: int, vocab_size: int, padded_vocab: int):
    import torch

    ids = prompt_BP
    for _ in range(new_tokens):
        logits = forward_logits(model, ids, padded_vocab)
        ids = torch.cat([ids, logits[:, -1, :vocab_size].argmax(-1, keepdim=True)], dim=1)
    return ids


def worker_train(cfg, dest: Path) -> dict:
    """Our pretrain components without the CLI: loader, model, DDP, optimizer, schedule, train_step."""
    from megatron.core import parallel_state

    from data_pipeline.loader import build_loader
    from data_pipeline.schedule import build_schedule
    from hybrid_megatron.model.build import build_model_chunks
    from hybrid_megatron.training.loop import _ensure_data, _wire_grad_sync, _wrap, build_optimizer
    from hybrid_megatron.training.lr import PhasedScheduler, plan_segments
    from hybrid_megatron.training.step import train_step

    import torch

    _ensure_data(cfg, torch.distributed.get_rank())
    schedule = build_schedule(cfg.data)
    max_seq = int(schedule.seq_len.max())
    model = _wrap(cfg, build_model_chunks(cfg, cfg.model.vocab_size, max_seq))
    _wire_grad_sync(model)
    optimizer = build_optimizer(cfg, model)
    scheduler = PhasedScheduler(optimizer, plan_segments(cfg, schedule.phase.tolist(), cfg.data.phases),
                                cfg.optim.weight_decay)
    loader = build_loader(cfg.data, parallel_state.get_data_parallel_rank(),
                          parallel_state.get_data_parallel_world_size())
    losses = []
    for m in model:
        m.train()
    for _ in range(cfg.train.train_steps):
        losses.append(train_step(next(loader), model, optimizer, scheduler, cfg, max_seq).loss)
    loader.close()
    (bare,) = [m.module for m in model]  # fp32: DDP wraps the HybridModel directly
    _save_model_only(bare, cfg, dest)
    return {"losses": losses}


def strict_fp32_env(triton_cache: Path) -> None:
    """Triton's fp32 ``tl.dot`` in IEEE fp32 (not TF32), compiled afresh: the cache key ignores the setting."""
    shutil.rmtree(triton_cache, ignore_errors=True)
    triton_cache.mkdir(parents=True)
    os.environ["TRITON_F32_DEFAULT"] = "ieee"
    os.environ["TRITON_CACHE_DIR"] = str(triton_cache)


def strict_fp32_torch() -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def _spec_config(cfg, layer_spec: str):
    import dataclasses

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, layer_spec=layer_spec))


def worker_record(cfg, source: Path, out_dir: Path, reference: str = "fp32") -> dict:
    import contextlib

    import torch

    from hybrid_megatron.model.build import padded_vocab_size

    vocab = cfg.model.vocab_size
    padded = padded_vocab_size(vocab, cfg.model, cfg.parallel.tensor_model_parallel_size)
    source_step = _resolve_step(source)
    src_model = _fresh_model(cfg)
    source_prefix = _load_weights(src_model, source_step)
    step_dir = _save_model_only(src_model, cfg, out_dir / "ckpt")
    te_model = _fresh_model(cfg)  # the reference comes from exactly the fixture's checkpoint
    _load_weights(te_model, step_dir)

    docs = cfg.data.source_paths().get("docs") or next(iter(cfg.data.source_paths().values()))
    tokens = sample_tokens(docs, (BATCH - 1) * WINDOW_STRIDE + SEQ)
    ids = windows_from_tokens(tokens).cuda()
    te_logits = forward_logits(te_model, ids, padded)
    src_logits = forward_logits(src_model, ids, padded)
    info = {"source": str(source_step), "source_key_prefix": source_prefix,
            "reload_max_abs_diff": float((te_logits - src_logits).abs().max())}
    model, logits, math_attention = te_model, te_logits, contextlib.nullcontext
    if reference == "fp32":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        strict_fp32_torch()
        model = _fresh_model(_spec_config(cfg, "local"))  # megatron's local layers: no TE GEMMs
        _load_weights(model, step_dir)
        math_attention = lambda: sdpa_kernel(SDPBackend.MATH)  # noqa: E731
        with math_attention():
            logits = forward_logits(model, ids, padded)
        info["te_tf32_max_abs_diff"] = float((te_logits - logits).abs().max())
    with math_attention():
        greedy_ids = greedy(model, ids[:, :PROMPT_LEN], NEW_TOKENS, vocab, padded)
    if _rank0():
        write_reference(out_dir / "reference.pt", ids, logits, greedy_ids, PROMPT_LEN)
    torch.distributed.barrier()
    return {**info, "reference_precision": "fp32" if reference == "fp32" else "tf32",
            "reference_model": "local spec, strict fp32" if reference == "fp32" else "TE spec (TF32 GEMMs)",
            "logit_scale": float(logits.abs().max()), "padded_vocab": padded}


def _resolve_step(path: Path) -> Path:
    from hybrid_megatron.convert import ckpt_io

    return ckpt_io.resolve_step_dir(path)


def worker(args: argparse.Namespace) -> int:
    from hybrid_megatron.training import distributed

    layout = json.loads(args.layout)
    cfg = load_config(args.fixture, Path(args.run_dir), args.steps, layout)
    if args.worker == "record" and args.reference == "fp32":
        # before anything compiles; one cache per rank (each empties its own)
        strict_fp32_env(Path(args.run_dir).parent / f"triton_cache_ieee_rank{os.environ.get('RANK', '0')}")
    distributed.initialize(cfg)
    if args.worker == "train":
        info = worker_train(cfg, Path(args.dest))
    else:
        info = worker_record(cfg, Path(args.source), Path(args.dest), args.reference)
    if _rank0() and args.info:
        Path(args.info).write_text(json.dumps(info))
    distributed.shutdown()
    return 0


# ---------------------------------------------------------------------------------------------------
# driver (no CUDA here: every GPU step runs in a child process)


def _worker_argv(mode: str, name: str, run_dir: Path, steps: int, layout: dict, dest: Path, info: Path,
                 source: Path | None = None, reference: str = "fp32") -> list[str]:
    argv = [str(Path(__file__).resolve()), "--worker", mode, "--fixture", name, "--run-dir", str(run_dir),
            "--steps", str(steps), "--layout", json.dumps(layout), "--dest", str(dest), "--info", str(info),
            "--reference", reference]
    return argv + (["--source", str(source)] if source else [])


def make_fixture(name: str, args: argparse.Namespace, work: Path) -> dict:
    layout, n = FIXTURES[name], nproc(name)
    run_dir = work / name / "run"
    shutil.rmtree(work / name, ignore_errors=True)
    (work / name).mkdir(parents=True)
    row: dict = {"name": name, **layout, "pattern": MODEL["hybrid_layer_pattern"], "steps": args.steps, "attempts": []}
    source = None
    if args.train == "cli":
        cli = ["-m", "hybrid_megatron", "pretrain", "configs/tiny.yaml", *overrides(name, run_dir, args.steps)]
        code, tail = launch(n, cli, args.timeout_s, work / name / "train_cli.log")
        row["attempts"].append({"how": "pretrain CLI", "exit": code, **({"tail": tail} if code else {})})
        if code == 0:
            source, row["trained_by"] = run_dir / "checkpoints", "pretrain CLI"
            losses = [json.loads(x)["loss"] for x in (run_dir / "losses.jsonl").read_text().splitlines()]
            row["loss_first"], row["loss_last"] = losses[0], losses[-1]
        else:
            print(f"[{name}] pretrain CLI failed (exit {code}); training in a worker instead. Output tail:\n{tail}",
                  file=sys.stderr)
    if source is None:
        dest, info = work / name / "trained", work / name / "train_info.json"
        argv = _worker_argv("train", name, run_dir, args.steps, layout, dest, info)
        code, tail = launch(n, argv, args.timeout_s, work / name / "train_worker.log")
        row["attempts"].append({"how": "in-process worker", "exit": code, **({"tail": tail} if code else {})})
        if code != 0:
            return {**row, "status": "failed", "error": f"training failed (exit {code}): {tail[-600:]}"}
        losses = json.loads(info.read_text())["losses"]
        source, row["trained_by"] = dest, "in-process worker (components of pretrain, no CLI)"
        row["loss_first"], row["loss_last"] = losses[0], losses[-1]
    out_dir = Path(args.out) / name
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    info = work / name / "record_info.json"
    argv = _worker_argv("record", name, run_dir, args.steps, layout, out_dir, info, source, args.reference)
    code, tail = launch(n, argv, args.timeout_s, work / name / "record.log")
    if code != 0:
        return {**row, "status": "failed", "error": f"recording failed (exit {code}): {tail[-1200:]}"}
    row.update(json.loads(info.read_text()))
    try:
        row.update(check_fixture(out_dir, args.max_fixture_bytes))
    except Exception as exc:
        return {**row, "status": "failed", "error": f"fixture check: {exc}"}
    from benchmarks._common import versions  # the same version record the benchmarks write

    meta = {k: v for k, v in row.items() if k not in ("attempts",)}
    meta.update(recorded=time.strftime("%Y-%m-%dT%H:%M:%S%z"), versions=versions(), device=device_name())
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return {**row, "status": "ok"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", default="tp1,tp2,pp2", help=f"comma list of {', '.join(FIXTURES)}")
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "convert"), help="fixture root (<out>/<name>/)")
    ap.add_argument("--work", default="/tmp/convert_fixtures_work", help="training runs and logs")
    ap.add_argument("--steps", type=int, default=200,
                    help="training steps (32k tokens each): enough for logits whose top-1 bf16 rounding rarely flips")
    ap.add_argument("--reference", choices=("fp32", "te"), default="fp32",
                    help="fp32: strict fp32 logits (local spec, no TF32); te: the TE model's logits (TF32 GEMMs)")
    ap.add_argument("--train", choices=("cli", "worker"), default="cli",
                    help="cli: the pretrain CLI (falls back to the worker on failure); worker: components directly")
    ap.add_argument("--timeout-s", type=float, default=240.0, help="per launched process")
    ap.add_argument("--max-fixture-bytes", type=int, default=MAX_FIXTURE_BYTES)
    ap.add_argument("--summary", default=None, help="summary JSON (default <work>/summary.json)")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to assume (default: nvidia-smi -L)")
    # internal: one rank of a worker
    ap.add_argument("--worker", choices=("train", "record"), help=argparse.SUPPRESS)
    for flag in ("--fixture", "--run-dir", "--layout", "--dest", "--source", "--info"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.fixtures.split(",") if n.strip()]
    unknown = [n for n in names if n not in FIXTURES]
    if unknown or not names:
        ap.error(f"--fixtures: unknown {unknown} (known: {', '.join(FIXTURES)})")
    if args.steps < 2:
        ap.error("--steps must be >= 2")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    summary_path = Path(args.summary or work / "summary.json")
    gpus = visible_gpus() if args.gpus is None else args.gpus
    summary = {"gpus": gpus, "out": args.out, "fixtures": []}
    for name in args.names:
        start = time.perf_counter()
        if nproc(name) > gpus:
            row = {"name": name, **FIXTURES[name], "status": "skipped", "error": f"needs {nproc(name)} GPUs, {gpus} visible"}
        else:
            try:
                row = make_fixture(name, args, work)
            except Exception as exc:  # keep going with the next fixture; the summary says what broke
                row = {"name": name, "status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        row["seconds"] = round(time.perf_counter() - start, 1)
        summary["fixtures"].append(row)
        summary_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
        print(f"[{name}] {row['status']} in {row['seconds']} s {row.get('error', '')[:300]}", flush=True)
    total = sum(r.get("bytes", 0) for r in summary["fixtures"])
    summary["total_bytes"] = total
    summary_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"\n{'fixture':<8}{'status':<9}{'tp':>3}{'pp':>3}{'loss':>14}{'reload diff':>13}{'TE-TF32 diff':>14}"
          f"{'logit max':>11}{'bytes':>11}  trained by")
    for r in summary["fixtures"]:
        loss = f"{r['loss_first']:.2f}->{r['loss_last']:.2f}" if "loss_last" in r else "-"
        diff = f"{r['reload_max_abs_diff']:.1e}" if "reload_max_abs_diff" in r else "-"
        tf32 = f"{r['te_tf32_max_abs_diff']:.1e}" if "te_tf32_max_abs_diff" in r else "-"
        scale = f"{r['logit_scale']:.2f}" if "logit_scale" in r else "-"
        print(f"{r['name']:<8}{r['status']:<9}{r.get('tp', '-'):>3}{r.get('pp', '-'):>3}{loss:>14}{diff:>13}{tf32:>14}"
              f"{scale:>11}{r.get('bytes', 0):>11,}  {r.get('trained_by', r.get('error', ''))[:60]}")
    print(f"total {total:,} bytes in {args.out}; summary {summary_path}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in summary["fixtures"]) else 1


if __name__ == "__main__":
    sys.exit(main())
