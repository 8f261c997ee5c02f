"""Continuations of prompts through the megatron forward, greedy or sampled, at any TP/PP/DP.

Every step runs the whole of each unfinished row again (no KV cache: diagnostics on models up to a few
billion parameters, not serving): the rows go in as one packed micro-batch, one document each, and the
logits at each row's last position give its next token. The last pipeline stage picks the tokens (argmax,
or a sample at the temperature from a generator seeded with ``seed`` and the data-parallel rank, the same
on every tensor-parallel rank) and shares them along the pipeline. Each data-parallel rank decodes its own
prompts. Rows stop at EOS when asked, or after ``max_new`` tokens.
"""

from __future__ import annotations

from functools import partial

import numpy as np


def next_tokens(logits, *, last_positions, temperature: float, generator, vocab_size: int):
    """The loss function of a decoding step: the next token of every row (its last position's logits,
    gathered over TP, padding rows excluded), in the report's ``next``."""
    import torch
    from megatron.core import parallel_state

    rows = logits[0, last_positions].float().contiguous()  # [rows, vocab / TP]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:  # shards in rank order make the whole vocabulary
        shards = [torch.empty_like(rows) for _ in range(tp)]
        torch.distributed.all_gather(shards, rows, group=parallel_state.get_tensor_model_parallel_group())
        rows = torch.cat(shards, dim=-1)
    rows = rows[:, :vocab_size]
    if temperature == 0:
        nxt = rows.argmax(dim=-1)
    else:
        nxt = torch.multinomial(torch.softmax(rows / temperature, dim=-1), 1, generator=generator).squeeze(1)
    zero = torch.zeros((), device=logits.device)
    return zero, torch.ones((), dtype=torch.int, device=logits.device), {"next": nxt.double()}


def _no_labels(mb, **kw):
    return partial(next_tokens, **kw)


def packed_rows(rows: list[np.ndarray], pad_multiple: int, device):
    """One micro-batch of documents ``rows`` ([1, total] tensors and PackedSeqParams), padded with a last
    document to a multiple of ``pad_multiple`` tokens (sequence parallelism splits the sequence over TP)."""
    import torch

    from hybrid_megatron.training.step import MicroBatch, packed_params

    lengths = [len(r) for r in rows]
    pad = -sum(lengths) % pad_multiple
    tokens = np.concatenate([*rows, np.zeros(pad, np.int64)]) if pad else np.concatenate(rows)
    seq_idx = np.repeat(np.arange(len(rows) + (1 if pad else 0)), lengths + ([pad] if pad else []))[None, :]
    positions = np.concatenate([np.arange(n) for n in lengths + ([pad] if pad else [])])

    def t(a, dtype=torch.long):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype).reshape(1, -1).to(device)

    mb = MicroBatch(input_ids=t(tokens), labels=t(np.zeros_like(tokens)), loss_mask=t(np.zeros(tokens.size),
                    torch.float32), position_ids=t(positions), packed_seq_params=packed_params(seq_idx, device))
    return mb, np.cumsum(lengths) - 1


def generate(chunks, cfg, prompts: list[np.ndarray], max_new: int, temperature: float, seed: int, eos_id: int,
             vocab_size: int, stop_at_eos: bool = True) -> list[list[int]]:
    """The new tokens of each of this data-parallel rank's ``prompts``."""
    import torch
    from megatron.core import parallel_state

    from hybrid_megatron.training.step import from_last_stage, schedule

    if not cfg.data.reset_at_document_boundaries:
        raise ValueError("decoding packs rows as documents: needs data.reset_at_document_boundaries=true")
    generator = torch.Generator(device="cuda").manual_seed(seed * 1000 + parallel_state.get_data_parallel_rank())
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pad_multiple = tp if cfg.parallel.sequence_parallel and tp > 1 else 1
    out: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    for _ in range(max_new):
        if not active:
            break
        rows = [np.concatenate([prompts[i], np.asarray(out[i], np.int64)]).astype(np.int64) for i in active]
        mb, last = packed_rows(rows, pad_multiple, torch.cuda.current_device())
        loss_of = partial(_no_labels, last_positions=torch.from_numpy(last).cuda(), temperature=temperature,
                          generator=generator, vocab_size=vocab_size)
        with torch.no_grad():
            reports = schedule([mb], 1, mb.input_ids.shape[1], chunks, cfg, forward_only=True, loss_of=loss_of,
                               logits=True)
        nxt = from_last_stage(reports, "next", (len(active),)).long().tolist()
        still = []
        for i, token in zip(active, nxt):
            out[i].append(token)
            if not (stop_at_eos and token == eos_id):
                still.append(i)
        active = still
    return out
