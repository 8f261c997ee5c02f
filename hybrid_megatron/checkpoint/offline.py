"""Reading and writing our torch_dist checkpoints on CPU, without building a megatron model.

Reading goes through ``torch.distributed.checkpoint`` directly: the ``.metadata`` file lists every
key with its global shape and dtype, and a load of one key reads only that tensor's bytes, so a
conversion holds one tensor group in memory at a time. Writing goes through megatron's own
``dist_checkpointing.save`` (single process, gloo), with the same ShardedTensor layout the model's
``sharded_state_dict`` produces, so ``pretrain`` loads the result at any TP/PP.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from data_pipeline.errors import DataError
from hybrid_megatron.checkpoint import layout
from hybrid_megatron.checkpoint.safe_metadata import filesystem_reader
from hybrid_megatron.config_io import build

from hybrid_megatron.model.config import ModelConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def load_model_config(step_dir: Path) -> ModelConfig:
    """The ``model:`` section of the checkpoint's ``run_config.yaml``."""
    path = step_dir / layout.RUN_CONFIG
    if not path.is_file():
        raise DataError(f"{path} is missing: the converter needs the model section the run was trained with")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise DataError(f"{path} has no 'model:' section")
    return build(ModelConfig, raw["model"], "model")


class CheckpointReader:
    """Per-key reads of a torch_dist checkpoint's global tensors."""

    def __init__(self, step_dir: Path):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.step_dir = step_dir
        self._reader = filesystem_reader(step_dir)  # .metadata through the restricted unpickler
        metadata = self._reader.read_metadata()
        self.tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            key: (tuple(meta.size), meta.properties.dtype)
            for key, meta in metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata)
        }

    def read(self, keys: tuple[str, ...] | list[str]) -> list[torch.Tensor]:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        if not keys:
            return []
        missing = [k for k in keys if k not in self.tensors]
        if missing:
            raise DataError(f"{self.step_dir}: checkpoint has no tensor {missing[0]!r}")
        out = {k: torch.empty(self.tensors[k][0], dtype=self.tensors[k][1]) for k in keys}
        try:
            with warnings.catch_warnings():  # one process on purpose: torch's notice would precede every error line
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(out, storage_reader=self._reader, no_dist=True)
        except (Exception, CheckpointException) as exc:  # noqa: BLE001  (a bad shard file: one line, no traceback)
            cause = _innermost_error(exc)
            raise DataError(f"{self.step_dir}: cannot read {keys[0]!r} from its shard files, truncated or corrupt "
                            f"({cause})") from None
        return [out[k] for k in keys]


def _innermost_error(exc: BaseException) -> str:
    """The last line of the failure torch wraps per rank (its CheckpointException holds a traceback text)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))
        if isinstance(exc, tuple):  # (exception, its stack summary)
            exc = exc[0]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1]}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------
# writing


@contextlib.contextmanager
def single_process_group():
    """A world of one (gloo) for megatron's save, unless the caller already set one up."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    # an in-memory store: a world of one needs no rendezvous port
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def cpu_only_save_patches():
    """megatron-core 0.19's sync save calls ``torch.cuda.synchronize()`` after staging tensors to host and
    builds its failure flag on ``torch.cuda.current_device()``. With CPU tensors and no GPU both are
    meaningless, so they become no-op / "cpu" for the duration of the save only."""
    import torch

    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved


def sharded_model_state(tensors: dict[str, torch.Tensor], dims) -> dict[str, Any]:
    """ShardedTensors for a TP=1 world of one, laid out as ``MambaMixer.sharded_state_dict`` lays them.

    ``tensors`` uses the stored keys; the split Mamba keys (``in_proj.weight.z`` ...) are regrouped and
    saved through megatron's own split factory, exactly like a training save at TP=1.
    """
    import torch
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.ssm.utils import _split_tensor_factory

    from hybrid_megatron.model.geometry import CONV_PARTS, IN_PROJ_PARTS

    split = {  # suffix of the stored sub-keys -> (parts, sizes)
        "in_proj.weight": (IN_PROJ_PARTS, dims.in_proj_sizes),
        "conv1d.weight": (CONV_PARTS, dims.conv_sizes),
        "conv1d.bias": (CONV_PARTS, dims.conv_sizes),
    }
    state: dict[str, Any] = {}
    done: set[str] = set()
    for key in tensors:
        if key in done:
            continue
        base, _, part = key.rpartition(".")
        stem = next((s for s in split if base.endswith(".mixer." + s)), None)
        if stem is None:
            state[key] = ShardedTensor.from_rank_offsets(key, tensors[key], replica_id=0)
            done.add(key)
            continue
        parts, sizes = split[stem]
        keys = [f"{base}.{p}" for p in parts]
        full = torch.cat([tensors[k] for k in keys], dim=0)
        state[base] = _split_tensor_factory(
            ShardedTensor.from_rank_offsets(base, full, replica_id=0), list(sizes), list(parts), 0
        )
        done.update(keys)
    return state


def save_torch_dist(step_dir: Path, state: dict[str, Any]) -> None:
    """megatron ``dist_checkpointing.save`` (torch_dist backend) of a sharded state dict, on CPU."""
    from megatron.core import dist_checkpointing

    step_dir.mkdir(parents=True, exist_ok=False)
    with single_process_group(), cpu_only_save_patches():
        dist_checkpointing.save(state, str(step_dir))


def save_model_only(save_dir: Path, state: dict[str, Any], model_section: dict) -> Path:
    """A weights-only ``step-000000`` under ``save_dir`` (tmp dir, then the layout's commit), with
    ``run_config.yaml`` holding ``model_section``; what ``convert from-hf`` writes and ``pretrain`` starts from."""
    import shutil

    tmp = Path(save_dir) / layout.tmp_dir_name(0)
    if tmp.exists():
        shutil.rmtree(tmp)
    save_torch_dist(tmp, state)
    files = layout.step_files(yaml.safe_dump({"model": model_section}, sort_keys=False),
                              {"weights_only": True, "step": 0})
    return layout.commit(Path(save_dir), tmp, 0, files, keep_last=None)
