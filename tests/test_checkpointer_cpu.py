"""The Checkpointer's torch_dist save and load on a CPU: gloo ranks, megatron's tensor-parallel linears.

A weights-only checkpoint (what ``checkpoint.save_initial`` and ``convert from-hf`` write) saved by two
TP ranks loads into one rank at TP=1 with every weight equal to the gathered shards (torch_dist
reshards), below a DDP-style wrapper; a checkpoint of another architecture is refused before any
tensor is read. The model is a two-linear stand-in (the hybrid forward needs CUDA); the checkpoint
code, megatron's sharded state dicts and dist_checkpointing are the real ones (with the converter's
no-op for the writer's ``torch.cuda.synchronize()``, as every CPU save here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from functools import partial

import pytest
import torch
import torch.distributed as dist

from gloo_world import run_ranks
from hybrid_megatron.checkpoint.offline import cpu_only_save_patches

ROOT = Path(__file__).resolve().parents[1]



def _model(tp: int, seed: int):
    """A DDP-like wrapper (``.module``) around a MegatronModule with a column- and a row-parallel linear."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(seed)
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                               tensor_model_parallel_size=tp)

    class Stand(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.fc1 = ColumnParallelLinear(16, 32, config=config, init_method=torch.nn.init.normal_, bias=False,
                                            gather_output=False)
            self.fc2 = RowParallelLinear(32, 16, config=config, init_method=torch.nn.init.normal_, bias=False,
                                         input_is_parallel=True, skip_bias_add=True)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    return Wrapper(Stand())


def _config(save_dir: Path, tp: int, *extra: str):
    from hybrid_megatron.config import load_run_config

    return load_run_config(ROOT / "configs" / "tiny.yaml", [f"checkpoint.save_dir={save_dir}",
                                                            f"parallel.tensor_model_parallel_size={tp}", *extra])


def _save_at_tp2(rank: int, out, save_dir: str) -> None:
    from hybrid_megatron.checkpoint.live import Checkpointer

    model = _model(tp=2, seed=0)
    with cpu_only_save_patches():  # megatron's sync writer calls torch.cuda.synchronize()
        Checkpointer(_config(Path(save_dir), 2), [model], optimizer=None, scheduler=None,
                     tokenizer={"kind": "bytes", "vocab_size": 257, "eos_id": 256}).save_weights(0)
    full = {}
    for name, dim in (("fc1", 0), ("fc2", 1)):
        shard = getattr(model.module, name).weight.detach()
        parts = [torch.empty_like(shard) for _ in range(2)]
        dist.all_gather(parts, shard)
        full[name] = torch.cat(parts, dim=dim)
    if rank == 0:
        torch.save(full, Path(save_dir) / "gathered.pt")


def _load_at_tp1(rank: int, results, save_dir: str, extra: list[str]) -> None:
    from hybrid_megatron.checkpoint.live import Checkpointer

    model = _model(tp=1, seed=1)  # another init: the load must overwrite it
    checkpointer = Checkpointer(_config(Path(save_dir), 1, *extra), [model], optimizer=None, scheduler=None)
    try:
        step_dir = checkpointer.find_resume_point()
        with cpu_only_save_patches():
            state = checkpointer.load(step_dir)
        results["state"] = state
        results["step_dir"] = step_dir.name
        results["weights"] = {n: getattr(model.module, n).weight.detach().clone() for n in ("fc1", "fc2")}
    except Exception as exc:  # reported to the test
        results["error"] = f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory) -> Path:
    save_dir = tmp_path_factory.mktemp("ckpt")
    run_ranks(partial(_save_at_tp2, save_dir=str(save_dir)), world=2, tp=2)
    return save_dir


def _load(save_dir: Path, *extra: str) -> dict:
    return run_ranks(partial(_load_at_tp1, save_dir=str(save_dir), extra=list(extra)), world=1)


def test_weights_only_save_is_committed_with_latest_and_no_training_state(tp2_checkpoint):
    assert (tp2_checkpoint / "latest").read_text().strip() == "step-000000"
    step = tp2_checkpoint / "step-000000"
    assert json.loads((step / "train_state.json").read_text()) == {"step": 0, "weights_only": True}
    assert json.loads((step / "data_tokenizer.json").read_text())["kind"] == "bytes"  # what to-hf exports
    assert sorted(p.name for p in (step / "rng").iterdir()) == ["rank-00000.pt", "rank-00001.pt"]
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata
    tensors = {k for k, v in metadata.items() if isinstance(v, TensorStorageMetadata)}
    assert tensors == {"fc1.weight", "fc2.weight"}  # no optimizer state, no wrapper prefix
    assert not list(tp2_checkpoint.glob("*.tmp"))


def test_tp2_weights_load_at_tp1_exactly(tp2_checkpoint):
    got = _load(tp2_checkpoint)
    assert "error" not in got, got.get("error")
    assert got["state"] == {} and got["step_dir"] == "step-000000"  # weights only: step 0, fresh optimizer
    gathered = torch.load(tp2_checkpoint / "gathered.pt")
    for name in ("fc1", "fc2"):
        assert torch.equal(got["weights"][name], gathered[name]), name


def test_another_architecture_is_refused_by_name(tp2_checkpoint):
    got = _load(tp2_checkpoint, "model.hidden_size=256", "model.ffn_hidden_size=768")
    assert got["error"].startswith("ConfigError: checkpoint ")
    assert "different architecture: model.hidden_size=512 there, 256 in this config" in got["error"]


def test_resume_refuses_a_crafted_metadata_before_torch_unpickles_it(tp2_checkpoint, tmp_path):
    """checkpoint.load= a downloaded checkpoint whose .metadata would run `touch` under plain pickle."""
    import pickle
    import shutil

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'PWNED'}",)

    crafted = tmp_path / "crafted"
    shutil.copytree(tp2_checkpoint, crafted)
    (crafted / "step-000000" / ".metadata").write_bytes(pickle.dumps(Exploit()))
    got = _load(tmp_path / "run", f"checkpoint.load={crafted}")
    assert got["error"].startswith("DataError: ") and "refuses to load posix.system" in got["error"], got
    assert not (tmp_path / "PWNED").exists()


def _as_training_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of the weights-only checkpoint whose train_state.json says it is a training one (step 40, a
    schedule and a data position): what checkpoint.load_weights_only must ignore."""
    import shutil

    shutil.copytree(src, dst)
    (dst / "step-000000" / "train_state.json").write_text(json.dumps(
        {"step": 40, "scheduler": {"num_steps": 40, "segments": []}, "data": {"position": 123}}))
    return dst


def test_load_weights_only_takes_the_weights_of_a_training_checkpoint_and_nothing_else(tp2_checkpoint, tmp_path):
    trained = _as_training_checkpoint(tp2_checkpoint, tmp_path / "trained")
    got = _load(tmp_path / "run", f"checkpoint.load={trained}", "checkpoint.load_weights_only=true")
    assert "error" not in got, got.get("error")
    assert got["state"] == {}  # step 0, fresh optimizer, schedule and data position
    gathered = torch.load(tp2_checkpoint / "gathered.pt")
    for name in ("fc1", "fc2"):
        assert torch.equal(got["weights"][name], gathered[name]), name
    # without the setting the same checkpoint resumes in full: it asks for the optimizer state (there is none here)
    assert "has no attribute 'sharded_state_dict'" in _load(tmp_path / "run", f"checkpoint.load={trained}")["error"]


def test_a_runs_own_checkpoints_resume_in_full_even_with_load_weights_only(tp2_checkpoint, tmp_path):
    """checkpoint.load_weights_only concerns the starting point: once the run has saved, its latest is its own."""
    own = _as_training_checkpoint(tp2_checkpoint, tmp_path / "own")
    got = _load(own, f"checkpoint.load={tp2_checkpoint}", "checkpoint.load_weights_only=true")
    assert "has no attribute 'sharded_state_dict'" in got["error"]  # a full resume: it asks for the optimizer state


def test_load_weights_only_without_load_is_one_line():
    from data_pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="checkpoint.load_weights_only=true needs checkpoint.load"):
        _config(ROOT / "runs" / "x", 1, "checkpoint.load_weights_only=true")
