"""``<run_dir>/losses.jsonl``: one JSON record per optimizer step, written by rank 0: ``step``, ``loss`` (mean per
loss token), ``grad_norm``, ``lr``, ``tokens`` (the step's loss tokens), ``input_tokens`` (every token the model ran
on, loss-masked or not: what throughput counts), ``seq_len``, ``phase``, ``skipped`` and ``time`` (its end).

A resumed run repeats the steps after its checkpoint, so the records past the resume step (steps a
crashed or preempted run took after its last checkpoint, and a torn last line) are dropped when the
run resumes: the file then holds each step once, in order, as a straight run would have written it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


class LossLog:
    def __init__(self, path: Path, resume_step: int):
        self.path = Path(path)
        if self.path.exists():
            self._truncate_after(resume_step)
        self._file = open(self.path, "a")

    def _truncate_after(self, step: int) -> None:
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                dropped += 1
                continue
            if int(record.get("step", 0)) <= step:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, self.path)
            log.info("%s: dropped %d record(s) past step %d (they are trained again)", self.path, dropped, step)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
