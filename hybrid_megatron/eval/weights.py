"""What a checkpoint's weights say about a hybrid (``hybrid-megatron inspect``), read on a CPU, no forward.

Per layer: the RMS and largest magnitude of every weight tensor, and with ``--against`` (another checkpoint of
the same architecture: the initial weights, an earlier step) how far each layer moved, ||W - W0|| / ||W0||,
over all its tensors: which layers learn, which sit where they were initialised.

For the Mamba-2 (``M``) and Gated DeltaNet (``G``) layers, each head's memory timescale. Both decay their state
by exp(-exp(A_log) * softplus(dt + dt_bias)) per token (Mamba-2's A = -exp(A_log), megatron's GatedDeltaNet
gate g likewise), where dt is a projection of the input. The weights alone fix the decay at dt = 0:
tau = 1 / (exp(A_log) * softplus(dt_bias)) tokens until the state falls to 1/e. The input moves each token's
step around that value (a forward sees it; the weights do not), so tau is the head's typical horizon, not a
bound. Heads whose tau reaches the training length carry information across the whole context (the "global"
channels of long-context Mamba studies); heads under ``SHORT_TOKENS`` are local. Mamba's D (the skip that
bypasses the state) is listed with them.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

from data_pipeline.errors import ConfigError
from hybrid_megatron.checkpoint import layout, offline
from hybrid_megatron.convert.mapping import is_model_key
from hybrid_megatron.model import pattern as pat

SHORT_TOKENS = 16  # a head whose state decays to 1/e within this many tokens keeps only local context
SLICE_ELEMENTS = 1 << 24  # elements summed at a time (128 MB in float64)
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_SSM_PREFIX = {pat.MAMBA: "mixer.", pat.GDN: "self_attention."}
# megatron's grouped-GEMM experts, stored stacked along a leading expert dim
_EXPERT_WEIGHTS = ("mlp.experts.experts.linear_fc1.weight", "mlp.experts.experts.linear_fc2.weight")
STILL = 0.1  # an expert that moved less than this share of its layer's median expert barely trained


def timescales(a_log, dt_bias) -> list[float]:
    """Each head's 1/e decay horizon in tokens at the bias step: 1 / (exp(A_log) * softplus(dt_bias))."""
    out = []
    for a, b in zip(a_log, dt_bias):
        softplus = math.log1p(math.exp(-abs(b))) + max(b, 0.0)  # overflow-free softplus
        out.append(1.0 / (math.exp(a) * softplus))
    return out


def _ssm_summary(taus: list[float], context: int | None, d_skip: list[float] | None) -> dict:
    out = {"timescales": taus, "min": min(taus), "median": statistics.median(taus), "max": max(taus),
           "short_heads": sum(t < SHORT_TOKENS for t in taus), "heads": len(taus)}
    if context:
        out["context_heads"] = sum(t >= context for t in taus)
    if d_skip is not None:
        out["D"] = d_skip
    return out


def _stats(tensor, before) -> dict:
    """Sums in float64 over slices of at most ``SLICE_ELEMENTS`` elements: a 7B model's embedding in float64 whole would
    take 8 GB beside the tensor as stored."""
    flat = tensor.reshape(-1)
    old = before.reshape(-1) if before is not None else None
    sq = change = base = 0.0
    peak = 0.0
    for start in range(0, flat.numel(), SLICE_ELEMENTS):
        x = flat[start:start + SLICE_ELEMENTS].double()
        sq += float((x * x).sum())
        peak = max(peak, float(x.abs().max()))
        if old is not None:
            y = old[start:start + SLICE_ELEMENTS].double()
            change += float(((x - y) ** 2).sum())
            base += float((y * y).sum())
    out = {"shape": list(tensor.shape), "numel": flat.numel(), "sum_sq": sq,
           "rms": math.sqrt(sq / max(flat.numel(), 1)), "max_abs": peak}
    if old is not None:
        out["change_sq"], out["before_sq"] = change, base
    return out


def _context(step_dir: Path) -> int | None:
    """The training length the run config records (the curriculum's longest, else data.seq_len)."""
    import yaml

    raw = yaml.safe_load((step_dir / layout.RUN_CONFIG).read_text()) or {}
    data = raw.get("data") if isinstance(raw, dict) else None
    if not isinstance(data, dict):
        return None
    curriculum = data.get("curriculum")
    if isinstance(curriculum, dict) and isinstance(curriculum.get("max_seq_len"), int):
        return curriculum["max_seq_len"]
    return data["seq_len"] if isinstance(data.get("seq_len"), int) else None


def inspect(checkpoint: str | Path, against: str | Path | None = None, context: int | None = None,
            progress: bool = False) -> dict:
    """Per-layer weight statistics and SSM timescales of a checkpoint (a step dir or a save dir's latest);
    ``progress``: a bar of the bytes read (a 7B checkpoint takes minutes)."""
    from tqdm import tqdm

    step_dir = layout.resolve_step_dir(checkpoint)
    cfg = offline.load_model_config(step_dir)
    reader = offline.CheckpointReader(step_dir)
    keys = sorted(k for k in reader.tensors if is_model_key(k) and 0 not in reader.tensors[k][0])
    base = base_dir = None
    if against is not None:
        base_dir = layout.resolve_step_dir(against, "--against ")
        base = offline.CheckpointReader(base_dir)
        for key in keys:
            if base.tensors.get(key, (None,))[0] != reader.tensors[key][0]:
                theirs = base.tensors.get(key, (None,))[0]
                raise ConfigError(f"--against {base_dir}: another architecture ({key} is "
                                  f"{list(theirs) if theirs else 'missing'} there, {list(reader.tensors[key][0])} here)")
    context = context or _context(step_dir)
    symbols = pat.layers(cfg.hybrid_layer_pattern)
    layers = [{"index": i, "symbol": s, "type": pat.LAYER_SYMBOLS[s], "tensors": {}} for i, s in enumerate(symbols)]
    ends: dict[str, dict] = {}
    total = sum(math.prod(reader.tensors[k][0]) * reader.tensors[k][1].itemsize for k in keys) * (2 if base else 1)
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc="inspect")
    for key in keys:
        (tensor,) = reader.read([key])
        bar.update(tensor.numel() * tensor.element_size() * (2 if base else 1))
        before = base.read([key])[0] if base is not None else None
        match = _LAYER_KEY.match(key)
        if match:
            layer = layers[int(match.group(1))]
            layer["tensors"][match.group(2)] = _stats(tensor, before)
            if match.group(2) in _EXPERT_WEIGHTS:  # [experts, rows, cols]: one slice per expert
                layer.setdefault("_experts", []).append([_stats(tensor[j], None if before is None else before[j])
                                                         for j in range(tensor.shape[0])])
        else:
            ends[key] = _stats(tensor, before)
    bar.close()
    for layer in layers:
        if "_experts" in layer:
            layer["experts"] = _expert_summary(layer.pop("_experts"), reader, layer, base is not None)
        if layer["symbol"] == pat.ATTENTION:
            layer["heads"] = _attention_heads(cfg, reader, base, layer)
        _layer_totals(layer, base is not None)
        prefix = _SSM_PREFIX.get(layer["symbol"])
        if prefix:
            ssm_keys = [layer_key(layer, prefix + "A_log"), layer_key(layer, prefix + "dt_bias")]
            a_log, dt_bias = reader.read(ssm_keys)
            d_skip = (reader.read([layer_key(layer, "mixer.D")])[0].tolist() if layer["symbol"] == pat.MAMBA else None)
            layer["ssm"] = _ssm_summary(timescales(a_log.double().tolist(), dt_bias.double().tolist()), context, d_skip)
            if base is not None:  # where the heads' horizons started: training lengthens or shortens them
                before = timescales(*(t.double().tolist() for t in base.read(ssm_keys)))
                layer["ssm"]["timescales_before"] = before
                layer["ssm"]["median_before"] = statistics.median(before)
    for stats in ends.values():
        _finish(stats, base is not None)
    return {"checkpoint": str(step_dir), "step": int(layout.read_train_state(step_dir).get("step", 0)),
            "pattern": cfg.hybrid_layer_pattern, "context": context,
            "against": str(base_dir) if base_dir is not None else None,
            "layers": layers, "ends": ends}


def _expert_summary(by_tensor: list[list[dict]], reader, layer: dict, compared: bool) -> dict:
    """Per routed expert: the RMS of its weights, how far they moved (an expert that never receives tokens keeps
    its initial weights), its router row's norm and, with aux-loss-free balancing, its routing bias (which grows
    for experts that get too few tokens)."""
    count = len(by_tensor[0])
    sums = [{k: sum(t[j].get(k, 0.0) for t in by_tensor) for k in ("numel", "sum_sq", "change_sq", "before_sq")}
            for j in range(count)]
    out: dict = {"count": count, "rms": [math.sqrt(x["sum_sq"] / x["numel"]) for x in sums]}
    if compared:
        out["relative_change"] = [math.sqrt(x["change_sq"] / x["before_sq"]) if x["before_sq"] else None for x in sums]
        moved = sorted(c for c in out["relative_change"] if c is not None)
        median = moved[len(moved) // 2] if moved else 0.0
        out["still"] = [j for j, c in enumerate(out["relative_change"]) if c is not None and c < STILL * median]
    router = layer_key(layer, "mlp.router.weight")
    if router in reader.tensors:
        (weight,) = reader.read([router])
        out["router_norm"] = weight.double().norm(dim=1).tolist()
    bias = layer_key(layer, "mlp.router.expert_bias")
    if bias in reader.tensors:
        out["expert_bias"] = reader.read([bias])[0].double().tolist()
    return out


def _attention_heads(cfg, reader, base, layer: dict) -> dict:
    """Per query head of an attention layer: the norm of its query rows and of its output-projection columns (what
    the head writes back; a head whose output columns are small barely contributes: "quiet"), and with ``base``
    how far the two moved. megatron's fused QKV holds per KV group [q heads of the group | k | v] rows."""
    hd, heads, groups = cfg.head_dim, cfg.num_attention_heads, cfg.num_kv_heads
    per_group = heads // groups
    keys = [layer_key(layer, "self_attention.linear_qkv.weight"), layer_key(layer, "self_attention.linear_proj.weight")]

    def slices(qkv, proj) -> list:
        out = []
        for h in range(heads):
            start = (h // per_group) * (per_group + 2) * hd + (h % per_group) * hd
            out.append((qkv[start:start + hd].double(), proj[:, h * hd:(h + 1) * hd].double()))
        return out

    mine = slices(*reader.read(keys))
    out: dict = {"count": heads, "query_norm": [float(q.norm()) for q, _ in mine],
                 "output_norm": [float(o.norm()) for _, o in mine]}
    median = statistics.median(out["output_norm"])
    out["quiet"] = [h for h, n in enumerate(out["output_norm"]) if n < STILL * median]
    if base is not None:
        theirs = slices(*base.read(keys))
        out["relative_change"] = [
            math.sqrt(float(((q - q0) ** 2).sum() + ((o - o0) ** 2).sum()) / float((q0 ** 2).sum() + (o0 ** 2).sum()))
            for (q, o), (q0, o0) in zip(mine, theirs)]
    return out


def layer_key(layer: dict, name: str) -> str:
    return f"decoder.layers.{layer['index']}.{name}"


def _finish(stats: dict, compared: bool) -> None:
    """Per tensor: its relative change, and no running sums left in what is written."""
    before, change = stats.pop("before_sq", None), stats.pop("change_sq", None)
    stats.pop("sum_sq")
    if compared:
        stats["relative_change"] = math.sqrt(change / before) if before else None


def _layer_totals(layer: dict, compared: bool) -> None:
    """The layer's RMS over its matrices (tensors of two or more dims: norm vectors and SSM scalars left out) and
    its relative change over every tensor."""
    tensors = layer["tensors"].values()
    matrices = [t for t in tensors if len(t["shape"]) >= 2]
    numel = sum(t["numel"] for t in matrices)
    layer["rms"] = math.sqrt(sum(t["sum_sq"] for t in matrices) / numel) if numel else None
    if compared:
        before = sum(t["before_sq"] for t in tensors)
        layer["relative_change"] = math.sqrt(sum(t["change_sq"] for t in tensors) / before) if before else None
    for t in tensors:
        _finish(t, compared)
