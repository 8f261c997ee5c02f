"""Numbers the docs show from estimates and plans are regenerated from the code (tools/doc_tables.py):
a change that moves one fails here until `python tools/doc_tables.py --write` updates the docs."""

from __future__ import annotations

import pytest

from tools import doc_tables


def test_every_generated_block_matches_the_code():
    assert doc_tables.drifted() == []


def test_a_drifted_block_is_detected_and_rewritten():
    text = "before <!-- generated: x -->\nold\n<!-- end generated --> after"
    assert doc_tables.render(text, "x", "new") == "before <!-- generated: x -->\nnew\n<!-- end generated --> after"
    inline = "a <!-- generated: y -->1 step<!-- end generated --> b"
    assert doc_tables.render(inline, "y", "2 steps") == "a <!-- generated: y -->2 steps<!-- end generated --> b"
    with pytest.raises(ValueError, match="no '<!-- generated: z -->' block"):
        doc_tables.render(text, "z", "")
