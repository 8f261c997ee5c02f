"""``hybrid-megatron data audit``: what every data-parallel rank reads, one JSON line per step and rank.

Line: ``{"step", "dp_rank", "phase", "seq_len", "tokens", "tokens_by_source", "replay_tokens",
"samples": [{"source", "hash"}]}``. The loader state after the last printed step can be written
(``--state-out``) and later resumed (``--state-in``): N straight steps print the same lines as k steps,
save, then N-k resumed steps. The state is the object checkpoints store.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.config import DataConfig
from data_pipeline.errors import ConfigError


def audit_lines(config: DataConfig, dp_size: int, steps: int, state: dict | None = None,
                out_state: list | None = None, ended: list | None = None) -> Iterator[dict]:
    """Yield audit records for up to ``steps`` steps (fewer if the run ends: then the step it ended at is
    appended to ``ended``), rank by rank per step."""
    from data_pipeline.loader import build_loader

    loaders = [build_loader(config, r, dp_size) for r in range(dp_size)]
    try:
        if state is not None:
            for ld in loaders:
                ld.load_state_dict(state)
        for _ in range(steps):
            try:
                batches = [next(ld) for ld in loaders]
            except StopIteration:
                if ended is not None:
                    ended.append(loaders[0].state_dict()["step"])
                break
            for rank, b in enumerate(batches):
                yield {"step": b.step, "dp_rank": rank, "phase": b.phase, "seq_len": b.seq_len,
                       "tokens": b.num_tokens, "tokens_by_source": b.tokens_by_source,
                       "replay_tokens": b.seq_len * sum(b.replay),
                       "samples": [{"source": s, "hash": h} for s, h in zip(b.sources, b.hashes)]}
        if out_state is not None:
            out_state.append(loaders[0].state_dict())
    finally:
        for ld in loaders:
            ld.close()


def run_audit(config_path: str, dp_size: int, steps: int, state_in: str | None, state_out: str | None,
              num_workers: int | None = None) -> int:
    import sys

    from data_pipeline.config import load_data_config

    if dp_size < 1:
        raise ConfigError(f"--dp-size {dp_size}: must be >= 1")
    if steps < 0:
        raise ConfigError(f"--steps {steps}: must be >= 0")
    if num_workers is not None and num_workers < 0:
        raise ConfigError(f"--num-workers {num_workers}: must be >= 0")
    if state_out and not Path(state_out).resolve().parent.is_dir():
        raise ConfigError(f"--state-out {state_out}: directory {Path(state_out).resolve().parent} does not exist")
    config = load_data_config(config_path)
    if num_workers is not None:
        config.num_workers = num_workers
    config.check_dp_size(dp_size)
    state = None
    if state_in:
        try:
            state = json.loads(Path(state_in).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--state-in {state_in}: cannot read a loader state ({exc})") from None
    final: list[dict] = []
    ended: list[int] = []
    for line in audit_lines(config, dp_size, steps, state, final, ended):
        sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
    if ended:
        print(f"data audit: the run ends after step {ended[0]}: printed up to there, not the {steps} steps "
              "asked for", file=sys.stderr)
    if state_out:
        tmp = Path(state_out + ".tmp")
        tmp.write_text(json.dumps(final[0], sort_keys=True) + "\n")
        tmp.replace(state_out)
    return 0


def run_validation_audit(config_path: str) -> int:
    """Prints, per validation source, its documents and how many it shares with each training source (all
    zero, or a DataError naming the first overlap, exit 3)."""
    from data_pipeline.config import load_data_config
    from data_pipeline.holdout import check_disjoint
    from data_pipeline.loader import open_sources, open_validation_sources

    config = load_data_config(config_path)
    if config.validation is None:
        raise ConfigError(f"{config_path}: no data.validation section to audit")
    report = check_disjoint(open_sources(config), open_validation_sources(config))
    print(json.dumps({"validation": report, "disjoint": True}, sort_keys=True))
    return 0
