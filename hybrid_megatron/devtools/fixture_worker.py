"""The GPU side of tools/make_convert_fixtures.py: one process per rank trains a fixture model or records
its checkpoint and megatron's reference logits (see that module's docstring for what is recorded)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import yaml

from hybrid_megatron.devtools.fixture_spec import (
    BATCH, NEW_TOKENS, PROMPT_LEN, SEQ, STEP_DIR, WINDOW_STRIDE, load_config, sample_tokens, windows_from_tokens,
    write_reference,
)


def _rank0() -> bool:
    import torch

    return torch.distributed.get_rank() == 0


def _save_model_only(model, cfg, save_dir: Path) -> Path:
    """Model-only torch_dist save at this process layout, laid out like ``convert from-hf`` output."""
    import torch
    from megatron.core import dist_checkpointing

    from hybrid_megatron.checkpoint import layout
    from hybrid_megatron.config_io import to_dict

    tmp = save_dir / layout.tmp_dir_name(0)
    if _rank0():
        shutil.rmtree(save_dir, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(tmp))
    torch.distributed.barrier()  # every rank's shards are written before the commit
    if _rank0():
        files = layout.step_files(yaml.safe_dump({"model": to_dict(cfg.model)}, sort_keys=False),
                                  {"weights_only": True, "step": 0})
        layout.commit(save_dir, tmp, 0, files, keep_last=None)
    torch.distributed.barrier()
    return save_dir / STEP_DIR


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
    """Our pretrain components without the CLI: the training state of ``build_train_state``, then train_step."""
    import torch

    from hybrid_megatron.training.setup import build_train_state
    from hybrid_megatron.training.step import train_step

    state = build_train_state(cfg, torch.distributed.get_rank())
    losses = []
    try:
        for m in state.model:
            m.train()
        for _ in range(cfg.train.train_steps):
            losses.append(train_step(next(state.loader), state.model, state.optimizer, state.scheduler, cfg,
                                     state.max_seq_len).loss)
    finally:
        state.close()
    (bare,) = [m.module for m in state.model]  # fp32: DDP wraps the HybridModel directly
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

    from hybrid_megatron.checkpoint import layout
    from hybrid_megatron.checkpoint.live import load_model_weights
    from hybrid_megatron.model.build import padded_vocab_size

    vocab = cfg.model.vocab_size
    padded = padded_vocab_size(vocab, cfg.model, cfg.parallel.tensor_model_parallel_size)
    source_step = layout.resolve_step_dir(source)
    src_model = _fresh_model(cfg)
    load_model_weights([src_model], source_step)
    step_dir = _save_model_only(src_model, cfg, out_dir / "ckpt")
    te_model = _fresh_model(cfg)  # the reference comes from exactly the fixture's checkpoint
    load_model_weights([te_model], step_dir)

    docs = Path(str(cfg.data.source_paths().get("docs") or next(iter(cfg.data.source_paths().values()))))
    tokens = sample_tokens(docs, (BATCH - 1) * WINDOW_STRIDE + SEQ)
    ids = windows_from_tokens(tokens).cuda()
    te_logits = forward_logits(te_model, ids, padded)
    src_logits = forward_logits(src_model, ids, padded)
    info = {"source": str(source_step), "reload_max_abs_diff": float((te_logits - src_logits).abs().max())}
    model, logits, math_attention = te_model, te_logits, contextlib.nullcontext
    if reference == "fp32":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        strict_fp32_torch()
        model = _fresh_model(_spec_config(cfg, "local"))  # megatron's local layers: no TE GEMMs
        load_model_weights([model], step_dir)
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
