"""to-hf of the same weights saved by two TP ranks equals to-hf of a TP=1 save.

Two gloo processes each save only their own TP slice (``ShardedTensor.from_rank_offsets``; Mamba in_proj
and conv1d through megatron's split factory with per-rank component sizes, as ``MambaMixer`` does). The
reader never sees ranks: this proves it, and that the per-component layout is reassembled correctly.
"""

from __future__ import annotations

import shutil

import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from hybrid_megatron.cli import main
from hybrid_megatron.convert import ckpt_io, mapping
from hybrid_megatron.convert.testing import random_nemotron_h, tp_save_worker



def test_tp2_save_exports_identically_to_tp1(tmp_path):
    random_nemotron_h(seed=3).save_pretrained(tmp_path / "hf")
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "tp1"), "--dtype", "fp32"]) == 0
    tp1_step = ckpt_io.resolve_step_dir(tmp_path / "tp1")
    cfg = ckpt_io.load_model_config(tp1_step)
    reader = ckpt_io.CheckpointReader(tp1_step)
    keys = [k for k in reader.tensors if mapping.is_model_key(k)]
    torch.save(dict(zip(keys, reader.read(keys))), tmp_path / "tensors.pt")

    tp2_step = tmp_path / "tp2" / "step-000007"
    tp2_step.mkdir(parents=True)
    args = (2, ckpt_io.free_port(), str(tp2_step), str(tmp_path / "tensors.pt"), mapping.Dims.of(cfg))
    mp.start_processes(tp_save_worker, args=args, nprocs=2, join=True, start_method="fork")
    for name in ("run_config.yaml", "train_state.json"):
        shutil.copy(tp1_step / name, tp2_step / name)
    (tmp_path / "tp2" / "latest").write_text("step-000007\n")

    # the TP=2 checkpoint really is sharded: two rank files, two chunks per TP-split tensor
    assert sorted(p.name for p in tp2_step.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    metadata = dcp.FileSystemReader(str(tp2_step)).read_metadata().state_dict_metadata
    assert len(metadata["decoder.layers.0.mixer.in_proj.weight.z"].chunks) == 2
    assert len(metadata["decoder.layers.1.self_attention.linear_qkv.weight"].chunks) == 2

    for name in ("tp1", "tp2"):
        assert main(["convert", "to-hf", str(tmp_path / name), str(tmp_path / f"{name}-hf"), "--dtype", "fp32",
                     "--no-progress"]) == 0
    for path in sorted((tmp_path / "tp1-hf").glob("*.safetensors")):
        assert path.read_bytes() == (tmp_path / "tp2-hf" / path.name).read_bytes(), path.name
    assert (tmp_path / "tp1-hf" / "config.json").read_text() == (tmp_path / "tp2-hf" / "config.json").read_text()


def test_naive_rank_concat_would_be_wrong():
    """Why the component-wise layout matters: concatenating rank blocks interleaves z, x, B, C, dt."""
    from hybrid_megatron.convert.testing import tiny_hf_config
    from hybrid_megatron.convert.hf_config import model_config_from_hf

    d = mapping.Dims.of(model_config_from_hf(tiny_hf_config()))
    full = [torch.randn(n, d.hidden) for n in d.in_proj_sizes]
    rank_blocks = [torch.cat([p.chunk(2)[r] for p in full]) for r in range(2)]
    assert not torch.equal(torch.cat(rank_blocks), torch.cat(full))
