"""Helpers for the conversion tests: a tiny random NemotronH, and megatron checkpoints written at TP/PP > 1.

``save_tp_sharded`` writes what a real TP-sharded training save writes for the model: every rank
contributes its own slice of each TP-split tensor through ``ShardedTensor.from_rank_offsets``, and the
Mamba in_proj / conv1d slices go through megatron's split factory with per-rank component sizes, as in
``MambaMixer.sharded_state_dict``. It runs inside an initialised process group of ``tp`` ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_PATTERN = "M*-M-*M-"


def tiny_hf_config(**overrides: Any) -> dict[str, Any]:
    """A NemotronH config small enough for CPU tests, with GQA and vocab padding (250 -> 256)."""
    cfg = {
        "model_type": "nemotron_h",
        "vocab_size": 250,
        "hidden_size": 64,
        "hybrid_override_pattern": TINY_PATTERN,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 96,
        "mamba_num_heads": 8,
        "mamba_head_dim": 16,
        "n_groups": 2,
        "ssm_state_size": 16,
        "conv_kernel": 4,
        "chunk_size": 16,
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": False,
        "time_step_min": 1.1754943508222875e-38,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    cfg.update(overrides)
    return cfg


def random_nemotron_h(seed: int = 0, **overrides: Any):
    """A randomly initialised fp32 ``NemotronHForCausalLM`` whose every parameter is non-trivial."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    kwargs = {k: v for k, v in tiny_hf_config(**overrides).items() if k != "model_type"}
    model = NemotronHForCausalLM(NemotronHConfig(**kwargs)).eval()
    with torch.no_grad():  # HF inits norms to ones and A_log/D deterministically: randomise all
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(1, 16)))
            elif name.endswith("dt_bias"):
                p.copy_(torch.empty_like(p).uniform_(-4, 0))
            elif name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
        for name, b in model.named_buffers():  # MoE gates: a non-zero score-correction bias
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model


def save_tp_sharded(step_dir: Path, tensors: dict, dims, tp_rank: int, tp_size: int) -> None:
    """Saves global ``tensors`` (stored keys, TP=1 layout) as ``tp_size`` ranks would, this rank's part."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.ssm.utils import _split_tensor_factory

    from hybrid_megatron.checkpoint.offline import cpu_only_save_patches
    from hybrid_megatron.model.geometry import CONV_PARTS, IN_PROJ_PARTS

    def shard(t, axis):  # this rank's contiguous slice along ``axis``
        return t.chunk(tp_size, dim=axis)[tp_rank].contiguous()

    replicated = ("layer_norm_weight", "final_norm.weight")
    row_parallel = ("linear_proj.weight", "linear_fc2.weight", "out_proj.weight")  # split along the input dim
    state: dict[str, Any] = {}
    done: set[str] = set()
    for key, t in tensors.items():
        if key in done:
            continue
        base, _, _ = key.rpartition(".")
        if base.endswith(("in_proj.weight", "conv1d.weight", "conv1d.bias")) and ".mixer." in base:
            parts = IN_PROJ_PARTS if base.endswith("in_proj.weight") else CONV_PARTS
            locals_ = [shard(tensors[f"{base}.{p}"], 0) for p in parts]
            local = torch.cat(locals_, dim=0)  # the rank's [z_r|x_r|B_r|C_r|dt_r] block, as in the live param
            st = ShardedTensor.from_rank_offsets(base, local, (0, tp_rank, tp_size), replica_id=0)
            state[base] = _split_tensor_factory(st, [x.shape[0] for x in locals_], list(parts), 0)
            done.update(f"{base}.{p}" for p in parts)
            continue
        if key.endswith(replicated):
            st = ShardedTensor.from_rank_offsets(key, t, replica_id=tp_rank)
        elif key.endswith(row_parallel):
            st = ShardedTensor.from_rank_offsets(key, shard(t, 1), (1, tp_rank, tp_size), replica_id=0)
        else:  # column parallel: qkv (whole groups per rank), fc1, embeddings, output layer, per-head SSM params
            st = ShardedTensor.from_rank_offsets(key, shard(t, 0), (0, tp_rank, tp_size), replica_id=0)
        state[key] = st
        done.add(key)
    with cpu_only_save_patches():
        dist_checkpointing.save(state, str(step_dir))


def stage_keys(keys, stage: int, stage_layers: list[int]) -> list[str]:
    """The stored keys pipeline stage ``stage`` saves when stage s holds ``stage_layers[s]`` layers: its
    ``decoder.layers.N`` with global N (megatron offsets them), the embedding on the first stage, the final
    norm and output layer on the last."""
    first = sum(stage_layers[:stage])
    mine = range(first, first + stage_layers[stage])
    last = stage == len(stage_layers) - 1
    out = []
    for key in keys:
        if key.startswith("decoder.layers."):
            if int(key.split(".")[2]) in mine:
                out.append(key)
        elif key.startswith("embedding."):
            if stage == 0:
                out.append(key)
        elif last:  # decoder.final_norm, output_layer
            out.append(key)
    return out


def tp_save_worker(rank: int, world_size: int, port: int, step_dir: str, tensors_file: str, dims,
                   stage_layers: list[int] | None = None) -> None:
    """One rank of a TP (x PP) save (``torch.multiprocessing.spawn`` target, gloo on CPU). Without
    ``stage_layers`` all ranks are TP ranks; with it, ranks are TP-major within each of its
    ``len(stage_layers)`` pipeline stages, and each stage saves only its own keys."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        tensors = torch.load(tensors_file)
        tp_size = world_size // (len(stage_layers) if stage_layers else 1)
        if stage_layers:
            tensors = {k: tensors[k] for k in stage_keys(tensors, rank // tp_size, stage_layers)}
        save_tp_sharded(Path(step_dir), tensors, dims, tp_rank=rank % tp_size, tp_size=tp_size)
    finally:
        dist.destroy_process_group()


def hf_tensors(hf_dir: Path) -> dict:
    """Every tensor of an HF checkpoint directory (all safetensors shards), keys with the ``backbone.`` prefix."""
    from safetensors import safe_open

    from hybrid_megatron.convert.mapping import strip_hf_prefix

    out = {}
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({strip_hf_prefix(k): f.get_tensor(k) for k in f.keys()})
    return out
