"""What a size law is measured in (``compare --size-by``), and sizes as people write them: 7B, 350M, 1e23.

Free of numpy, so that the command line can offer the choices without loading the fitting code.
"""

from __future__ import annotations

import re

from data_pipeline.errors import ConfigError

SIZE_MEASURES = ("params", "non-embedding", "active", "flops")  # total, Kaplan's N, MoE's active, training compute
_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def unit(measure: str) -> str:
    return "training FLOPs" if measure == "flops" else "parameters"


def parse_size(text: str, what: str = "--predict") -> float:
    """A parameter count or a FLOP budget: ``7e9``, ``7B``, ``1.3B``, ``350M``, ``1e23``; ``what`` names the
    setting in the error."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBGTkmbgt]?)\s*", text)
    value = float(match.group(1)) * _SUFFIX[match.group(2).upper()] if match else 0.0
    if not match or value < 1:
        if what == "--budget":
            raise ConfigError(f"--budget {text!r}: expected a number of training FLOPs such as 1e23")
        flops = " (with --size-by flops: a FLOP budget such as 1e23)" if what == "--predict" else ""
        raise ConfigError(f"{what} {text!r}: expected a parameter count such as 7e9, 7B or 350M{flops}")
    return value


def count_text(n: float, measure: str = "params") -> str:
    """A size as people write it: 7B, 350M, 6.34B parameters; 1.2e+23 FLOPs."""
    if measure == "flops":
        return f"{n:.3g}"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"
