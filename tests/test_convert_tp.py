"""to-hf of the same weights saved at TP=2, PP=2 (uneven, 5 + 3 layers) and TP=2 x PP=2 equals to-hf of a TP=1 save.

Two gloo processes each save only their own TP slice (``ShardedTensor.from_rank_offsets``; Mamba in_proj
and conv1d through megatron's split factory with per-rank component sizes, as ``MambaMixer`` does). The
reader never sees ranks: this proves it, and that the per-component layout is reassembled correctly.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from hybrid_megatron.cli import main
from hybrid_megatron.checkpoint import layout, offline
from hybrid_megatron.convert import mapping
from hybrid_megatron.training.distributed import free_port
from hybrid_megatron.convert.testing import random_nemotron_h, tp_save_worker



# (name, processes, layers per pipeline stage or None for TP only); TINY_PATTERN has 8 layers, cut 5 + 3
LAYOUTS = [("tp2", 2, None), ("pp2", 2, [5, 3]), ("tp2pp2", 4, [5, 3])]


@pytest.mark.parametrize("name,world,stage_layers", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_sharded_save_exports_identically_to_tp1(tmp_path, name, world, stage_layers):
    random_nemotron_h(seed=3).save_pretrained(tmp_path / "hf")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "tp1"), "--dtype", "fp32"]) == 0
    tp1_step = layout.resolve_step_dir(tmp_path / "tp1")
    cfg = offline.load_model_config(tp1_step)
    reader = offline.CheckpointReader(tp1_step)
    keys = [k for k in reader.tensors if mapping.is_model_key(k)]
    torch.save(dict(zip(keys, reader.read(keys))), tmp_path / "tensors.pt")

    step = tmp_path / name / "step-000007"
    step.mkdir(parents=True)
    args = (world, free_port(), str(step), str(tmp_path / "tensors.pt"), mapping.Dims.of(cfg), stage_layers)
    mp.start_processes(tp_save_worker, args=args, nprocs=world, join=True, start_method="fork")
    for f in ("run_config.yaml", "train_state.json"):
        shutil.copy(tp1_step / f, step / f)
    (tmp_path / name / "latest").write_text("step-000007\n")

    # the checkpoint really is sharded: a file per rank, a chunk per TP rank of each TP-split tensor,
    # and each pipeline stage's layers only in its own ranks' files
    tp = world // len(stage_layers or [None])
    assert sorted(p.name for p in step.glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(world)]
    metadata = dcp.FileSystemReader(str(step)).read_metadata()
    assert len(metadata.state_dict_metadata["decoder.layers.0.mixer.in_proj.weight.z"].chunks) == tp
    assert len(metadata.state_dict_metadata["decoder.layers.1.self_attention.linear_qkv.weight"].chunks) == tp
    if stage_layers:
        files = {k.fqn.split(".")[2]: v.relative_path for k, v in metadata.storage_data.items()
                 if k.fqn.startswith("decoder.layers.")}
        first_stage = {f"__{r}_0.distcp" for r in range(tp)}
        assert all((files[str(i)] in first_stage) == (i < stage_layers[0]) for i in range(sum(stage_layers)))

    for run in ("tp1", name):
        assert main(["convert", "to-hf", str(tmp_path / run), str(tmp_path / f"{run}-hf"), "--dtype", "fp32",
                     "--no-progress"]) == 0
    for path in sorted((tmp_path / "tp1-hf").glob("*.safetensors")):
        assert path.read_bytes() == (tmp_path / f"{name}-hf" / path.name).read_bytes(), path.name
    assert (tmp_path / "tp1-hf" / "config.json").read_text() == (tmp_path / f"{name}-hf" / "config.json").read_text()


def test_naive_rank_concat_would_be_wrong():
    """Why the component-wise layout matters: concatenating rank blocks interleaves z, x, B, C, dt."""
    from hybrid_megatron.convert.testing import tiny_hf_config
    from hybrid_megatron.convert.hf_config import model_config_from_hf

    d = mapping.Dims.of(model_config_from_hf(tiny_hf_config()))
    full = [torch.randn(n, d.hidden) for n in d.in_proj_sizes]
    rank_blocks = [torch.cat([p.chunk(2)[r] for p in full]) for r in range(2)]
    assert not torch.equal(torch.cat(rank_blocks), torch.cat(full))
