"""Loss records and run results shaped as tools/loss_parity.py reads them, for its CPU tests."""

from __future__ import annotations


def loss_records(steps, loss=lambda s: 5.0 - 0.01 * s, tokens=600, t0=100.0, dt=0.5) -> list[dict]:
    """Records as losses.jsonl has them: 1000 input tokens a step, of which ``tokens`` were trained (loss tokens)."""
    return [{"step": s, "loss": loss(s), "tokens": tokens, "input_tokens": 1000, "time": t0 + dt * s} for s in steps]


def ok_run(records: list[dict]) -> dict:
    return {"status": "ok", "losses": records}
