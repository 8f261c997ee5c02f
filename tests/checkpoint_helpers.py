"""Checkpoints for CPU tests, made from the recorded conversion fixtures (trained on the bytes sample data)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from data_pipeline.tokenizer import ByteTokenizer
from hybrid_megatron.checkpoint import layout
from hybrid_megatron.devtools import REPO_ROOT

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "convert" / "tp1" / "ckpt"


def quickstart_checkpoint(save_dir: Path) -> Path:
    """The fixture checkpoint copied to ``save_dir`` as `pretrain configs/tiny.yaml` leaves one: vocab_size
    unset in the run config, the data's tokenizer recorded beside it. Returns ``save_dir``."""
    shutil.copytree(FIXTURE, save_dir)
    step = save_dir / "step-000000"
    run_config = yaml.safe_load((step / layout.RUN_CONFIG).read_text())
    run_config["model"]["vocab_size"] = None
    (step / layout.RUN_CONFIG).write_text(yaml.safe_dump(run_config))
    files = layout.step_files("unused", {}, ByteTokenizer().describe())
    (step / layout.DATA_TOKENIZER).write_text(files[layout.DATA_TOKENIZER])
    return save_dir
