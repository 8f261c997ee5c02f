"""The two training steps ``benchmarks/train_throughput.py`` times side by side, and the batches it feeds them:
ours (``training/setup.build_training_model`` with our optimizer and ``train_step``) and megatron-core's stock hybrid
path (its ``HybridModel`` with its own TE spec, ``Float16Module``, DDP and default optimizer groups) built from the
same ``TransformerConfig``. Both take the same ``StepBatch`` and return the step's loss. GPU only, except
``synthetic_batches``."""

from __future__ import annotations

from functools import partial


def synthetic_batches(num: int, global_batch: int, seq_len: int, vocab: int, seed: int = 0,
                      doc_tokens: int = 0) -> list:
    """Uniform random tokens; with ``doc_tokens`` an end-of-document token (the last id) ends each token
    with probability 1/doc_tokens, so documents have geometric lengths of mean ~doc_tokens."""
    import numpy as np

    from data_pipeline.loader import StepBatch
    from data_pipeline.packing import build_arrays

    rng = np.random.default_rng(seed)
    eos = vocab - 1
    out = []
    for step in range(num):
        windows = rng.integers(0, eos, size=(global_batch, seq_len + 1), dtype=np.int64)
        if doc_tokens:
            windows[rng.random(windows.shape) < 1.0 / doc_tokens] = eos
        arrays = build_arrays(windows, eos, reset=bool(doc_tokens), eod_mask_loss=False)
        out.append(StepBatch(step=step, phase="pretrain", seq_len=seq_len, sources=["synthetic"] * global_batch,
                             hashes=[""] * global_batch, tokens_by_source={"synthetic": global_batch * seq_len},
                             **arrays))
    return out


def build_ours(cfg, seq_len: int):
    from hybrid_megatron.training.optimizer import build_optimizer
    from hybrid_megatron.training.setup import build_training_model
    from hybrid_megatron.training.lr import PhasedScheduler, Segment
    from hybrid_megatron.training.step import train_step

    model = build_training_model(cfg, cfg.model.vocab_size, seq_len)
    optimizer = build_optimizer(cfg, model)
    scheduler = PhasedScheduler(optimizer, [Segment(0, 10**6, 0.0, cfg.optim.lr, 0.0, 0, "linear")],
                                cfg.optim.weight_decay)

    def step(batch) -> float:
        return train_step(batch, model, optimizer, scheduler, cfg, seq_len).loss

    return model, optimizer, step


def _stock_loss(loss_mask, output_tensor):
    import torch

    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def _stock_forward_step(data_iterator, model):
    mb = next(data_iterator)
    output = model(mb.input_ids, mb.position_ids, attention_mask=None, labels=mb.labels,
                   packed_seq_params=mb.packed_seq_params)
    return output, partial(_stock_loss, mb.loss_mask)


def build_stock(cfg, seq_len: int):
    """megatron-core's own hybrid path: stock TE spec, Float16Module, DDP, default optimizer groups."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from hybrid_megatron.model import pattern as pat
    from hybrid_megatron.model.build import build_transformer_config, padded_vocab_size
    from hybrid_megatron.training.step import micro_batch_size_for, split_micro_batches

    config = build_transformer_config(cfg)  # the same TransformerConfig as ours: sizes, FP8 recipe
    model = HybridModel(config=config, hybrid_stack_spec=hybrid_stack_spec,
                        vocab_size=padded_vocab_size(cfg.model.vocab_size, cfg.model, 1),
                        max_sequence_length=seq_len, hybrid_layer_pattern=pat.layers(cfg.model.hybrid_layer_pattern),
                        position_embedding_type="none", share_embeddings_and_output_weights=False)
    model = Float16Module(config, model)
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True),
        module=model,
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    o = cfg.optim
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                        clip_grad=o.clip_grad, bf16=True, params_dtype=torch.bfloat16,
                        use_distributed_optimizer=True),
        [ddp],
    )
    forward_backward = get_forward_backward_func()

    def step(batch) -> float:
        n_local = batch.input_ids.shape[0]
        mbs = micro_batch_size_for(n_local, seq_len, cfg.train.micro_batch_size, seq_len)
        # numpy -> GPU, and the thd layout when packed, as ours
        micro = split_micro_batches(batch, mbs, cfg.data.reset_at_document_boundaries, torch.cuda.current_device())
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reduced = forward_backward(forward_step_func=_stock_forward_step, data_iterator=iter(micro), model=ddp,
                                   num_microbatches=len(micro), seq_length=seq_len, micro_batch_size=mbs,
                                   forward_only=False)
        optimizer.step()
        stats = sum(item["lm loss"].double() for item in reduced)
        return float(stats[0] / stats[1])

    return [ddp], optimizer, step
