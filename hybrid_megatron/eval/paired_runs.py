"""Runs against each other on the same MQAR items (``compare``): is one architecture's recall really higher?

Each run's latest ``eval --suite mqar`` keeps its outcomes per item and a fingerprint of the items
(``recall_suites``); two runs evaluated on the same grid with the same item seed were asked the same questions.
The first run with MQAR outcomes is the reference; every other run's cells are paired with the reference's cell of
the same key-value pairs and length, item by item, and tested with McNemar's test over items
(``paired.mcnemar_items``). A cell whose items differ (another seed, another vocabulary) or whose results predate
the per-item outcomes is listed as not compared, with the reason.
"""

from __future__ import annotations

from data_pipeline.errors import DataError
from hybrid_megatron.eval import paired
from hybrid_megatron.eval.report import p_text


def _cells(name: str, mqar: dict) -> dict[tuple[int, int], dict]:
    cells = mqar.get("cells", []) if isinstance(mqar, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) and isinstance(c.get("pairs"), int)
                                              and isinstance(c.get("seq_len"), int) for c in cells):
        raise DataError(f"{name}: its mqar results are not cells of pairs and seq_len (edited or damaged)")
    return {(c["pairs"], c["seq_len"]): c for c in cells}


def compare_runs(runs: list[tuple[str, dict | None]]) -> dict | None:
    """runs: (name, the ``mqar`` suite of its latest eval results, or None) in the order given. None when fewer
    than two runs have MQAR results; else {"reference", "rows", "not_compared"}."""
    with_mqar = [(name, _cells(name, mqar)) for name, mqar in runs if mqar]
    if len(with_mqar) < 2:
        return None
    not_compared = [f"{name}: its eval results keep no per-item outcomes (evaluated before they were recorded; "
                    "run eval again)" for name, cells in with_mqar
                    if not any("outcomes" in c for c in cells.values())]
    recorded = [(name, cells) for name, cells in with_mqar if any("outcomes" in c for c in cells.values())]
    if len(recorded) < 2:
        return {"reference": recorded[0][0] if recorded else None, "rows": [], "not_compared": not_compared}
    (ref_name, reference), others = recorded[0], recorded[1:]
    rows = []
    for name, cells in others:
        for key, cell in cells.items():
            ref = reference.get(key)
            where = f"{name}, {key[0]} pairs at length {key[1]}"
            if ref is None or "outcomes" not in ref:
                not_compared.append(f"{where}: {ref_name} has no outcomes for this cell")
            elif "outcomes" not in cell:
                not_compared.append(f"{where}: no per-item outcomes recorded")
            elif cell.get("items_fingerprint") != ref.get("items_fingerprint"):
                not_compared.append(f"{where}: other items than {ref_name}'s (another item seed or vocabulary)")
            else:
                try:
                    mine = paired.unpack_outcomes(cell["outcomes"], key[0])
                    theirs = paired.unpack_outcomes(ref["outcomes"], key[0])
                    test = paired.mcnemar_items(mine, theirs)
                except ValueError as exc:  # a results.json edited or damaged since eval wrote it
                    raise DataError(f"{where} against {ref_name}: per-item outcomes that do not pair ({exc})") from None
                rows.append({"run": name, "pairs": key[0], "seq_len": key[1], "items": int(mine.shape[0]),
                             "accuracy": float(mine.mean()), "reference_accuracy": float(theirs.mean()),
                             "difference": float(mine.mean() - theirs.mean()), "mcnemar_items": test})
    return {"reference": ref_name, "rows": rows, "not_compared": not_compared}


def markdown(result: dict) -> list[str]:
    """The report section of ``compare_runs``'s result."""
    lines = ["", f"## MQAR, run against {result['reference']} on the same items", "",
             "Each run's answers paired with the reference's, item by item; p: McNemar's test with the item as the "
             "unit (`eval/paired.py`).", ""]
    if result["rows"]:
        lines += ["| run | pairs | length | items | accuracy | reference | difference | p |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["rows"]:
            lines.append(f"| {r['run']} | {r['pairs']} | {r['seq_len']} | {r['items']} | {r['accuracy']:.4f} | "
                         f"{r['reference_accuracy']:.4f} | {r['difference']:+.4f} | "
                         f"{p_text(r['mcnemar_items']['p_value'])} |")
    if result["not_compared"]:
        lines += ["", "Not compared:", ""] + [f"- {why}" for why in result["not_compared"]]
    return lines + [""]
