"""The validation batches: the same windows every evaluation, whatever the data-parallel size.

Each validation source contributes ``tokens // (number of sources) // seq_len`` windows of ``seq_len + 1``
tokens read from the start of its stream (fewer when the source is smaller), rounded down to a multiple of
``batch_size_multiple`` so that every data-parallel size the training accepts splits them evenly. The global
list of windows depends on the config and the data alone; DP rank ``r`` takes the ``r``-th contiguous slice
of each source's windows, so the union over ranks is the same set for every DP size, and the loss averaged
over all of them is the same number. Windows are packed like training windows (document boundaries reset
positions and the Mamba state when the packing switch is on).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data_pipeline.config import DataConfig
from data_pipeline.errors import ConfigError, DataError
from data_pipeline.loader import StepBatch, TokenizerInfo, open_sources, open_validation_sources, tokenizer_info
from data_pipeline.packing import build_arrays, sample_hash, take_dropped
from data_pipeline.shards import SourceIndex
from data_pipeline.streams import SourceStream


@dataclass(frozen=True, slots=True)
class SourcePlan:
    name: str
    windows: int  # global windows of this source (a multiple of batch_size_multiple)


def plan(config: DataConfig, indexes: dict[str, SourceIndex], seq_len: int) -> list[SourcePlan]:
    """How many windows each validation source gives (the same on every rank)."""
    v = config.validation
    per_source = v.tokens // len(v.sources) // seq_len
    bsm = config.batch_size_multiple
    out = []
    for name in sorted(v.sources):
        fits = (indexes[name].num_tokens - 1) // seq_len  # whole windows of seq_len + 1 tokens
        n = min(per_source, fits) // bsm * bsm
        if n == 0:
            raise ConfigError(f"data.validation: source {name} gives no batch of {bsm} windows of {seq_len} tokens "
                              f"(data.validation.tokens={v.tokens} over {len(v.sources)} sources, "
                              f"{indexes[name].num_tokens} tokens in the source)")
        out.append(SourcePlan(name, n))
    return out


class ValidationSet:
    """This data-parallel rank's validation windows, one batch per source."""

    def __init__(self, config: DataConfig, dp_rank: int, dp_size: int, seq_len: int,
                 training: TokenizerInfo | None = None):
        """``training``: the training data's tokenizer when the caller has it (else its sources are opened)."""
        if config.validation is None:
            raise ConfigError("no data.validation section: there is nothing to validate on")
        config.check_dp_size(dp_size)
        self.config, self.dp_rank, self.dp_size = config, dp_rank, dp_size
        self.seq_len = config.validation.seq_len or seq_len
        self.indexes = open_validation_sources(config)
        training = training or tokenizer_info(open_sources(config))
        for name, ix in self.indexes.items():
            if ix.stats.get("tokenizer", {}).get("fingerprint") != training.tokenizer.get("fingerprint"):
                raise DataError(f"validation source {name} was tokenised with another tokenizer than the training data")
        self.plans = plan(config, self.indexes, self.seq_len)
        self.eos_id = training.eos_id

    @property
    def tokens_per_evaluation(self) -> int:
        return sum(p.windows for p in self.plans) * self.seq_len

    def batches(self) -> Iterator[StepBatch]:
        """One StepBatch per source with this rank's windows (all ranks: equal counts)."""
        data = self.config
        for p in self.plans:
            local = p.windows // self.dp_size
            first = self.dp_rank * local
            stream = SourceStream(p.name, self.indexes[p.name], data.seed)
            try:
                windows = np.empty((local, self.seq_len + 1), np.int64)
                targets = np.empty_like(windows, dtype=np.uint8) if stream.has_masks else None
                for row in range(local):
                    stream.read_into(windows[row], (first + row) * self.seq_len,
                                     None if targets is None else targets[row])
            finally:
                stream.close()
            arrays = build_arrays(windows, self.eos_id, data.reset_at_document_boundaries, data.eod_mask_loss,
                                  targets, data.document_multiple)
            dropped = take_dropped(arrays)
            yield StepBatch(step=-1, phase="validation", seq_len=self.seq_len, sources=[p.name] * local,
                            hashes=[sample_hash(w) for w in windows], tokens_by_source={p.name: local * self.seq_len},
                            dropped_tokens=dropped, **arrays)
