"""Run directories as ``pretrain`` writes them (config.yaml, losses.jsonl, val.jsonl), for ``compare`` on a CPU."""

from __future__ import annotations

import json
from collections.abc import Callable

import yaml

from hybrid_megatron.config import load_run_config
from hybrid_megatron.config_io import to_dict
from hybrid_megatron.devtools import REPO_ROOT
from hybrid_megatron.model.build import padded_vocab_size
from hybrid_megatron.model.flops import embedding_params, num_parameters

VOCAB = 257


def write_run(root, name, overrides=(), final_loss: Callable[[float], float] = lambda n: 3.0, steps=50,
              size_measure="params"):
    """``configs/tiny.yaml`` with ``overrides``; its last validation loss is ``final_loss(N)`` of its parameter
    count N (all of them, or the non-embedding ones), the train losses fall to just above it. Returns N."""
    cfg = load_run_config(REPO_ROOT / "configs" / "tiny.yaml",
                          ["model.vocab_size=257", f"logging.run_dir={root / name}", f"train.train_steps={steps}",
                           *overrides])
    padded = padded_vocab_size(VOCAB, cfg.model, 1)
    n = num_parameters(cfg.model, padded)
    if size_measure == "non-embedding":
        n -= embedding_params(cfg.model, padded)
    write_config_run(root / name, cfg, final_loss(n), steps)
    return n


def write_config_run(run, cfg, final: float, steps: int = 50) -> None:
    """The run directory of ``cfg`` trained to its end (``train.train_steps`` set to ``steps``): its config.yaml,
    train losses falling to just above ``final``, and a last validation loss of ``final`` (one seq_len of 1024 a
    step)."""
    run.mkdir(parents=True)
    raw = to_dict(cfg)
    raw["train"]["train_steps"] = steps
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with open(run / "losses.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "loss": final + 2.0 / s + 0.01, "tokens": 32768, "seq_len": 1024,
                                "skipped": False}) + "\n")
    (run / "val.jsonl").write_text(json.dumps({"step": steps, "loss": final, "tokens": 262144}) + "\n")
