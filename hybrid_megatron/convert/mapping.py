"""Tensor mapping between megatron-core's hybrid checkpoint keys and Hugging Face NemotronH.

Pure tensor code: no files, no process groups. Each ``TensorGroup`` names the megatron keys and the
HF keys that hold the same weights, with the two functions that turn one list into the other; both
directions are exact (splits, concatenations and reshapes only, never arithmetic).

megatron side (torch_dist stores global tensors, whatever TP/PP they were saved with):
  * TE names: each pre-norm is fused into the following linear as ``layer_norm_weight``.
  * ``mixer.in_proj.weight`` is stored as five sub-keys ``.z .x .B .C .dt`` and ``mixer.conv1d.{weight,bias}``
    as ``.x .B .C`` (``MambaMixer.sharded_state_dict`` splits each TP rank's [z_r|x_r|B_r|C_r|dt_r] block per
    component, so every sub-key is the global component). Concatenating the rank blocks naively would
    interleave components: never do that.
  * ``self_attention.linear_qkv.weight`` rows are grouped per query group g: [q_g (np/ng heads) | k_g | v_g].
  * Layer indices in the keys are global (``HybridStack`` uses ``layer_number - 1``), so PP does not show.
  * MoE layers (TE grouped GEMM): the experts of a layer are stored stacked, ``mlp.experts.experts.linear_fc1
    .weight`` [E, Fe, H] and ``...linear_fc2.weight`` [E, H, Fe] (expert axis first, whatever the EP layout);
    ``mlp.router.expert_bias`` [E] is a buffer, stored fp32, present with ``model.moe_expert_bias``.

Legend for shapes: H hidden, D d_inner (mamba heads x head dim), G groups x state dim, h mamba heads,
K conv kernel, np/ng query heads/groups, hn attention head dim, F ffn hidden, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hybrid_megatron.model import geometry as geo
from hybrid_megatron.model import pattern as pat
from hybrid_megatron.model.config import ModelConfig
from hybrid_megatron.model.geometry import CONV_PARTS, IN_PROJ_PARTS, SSM_FP32_NAMES

HF_PREFIX = "backbone."  # the prefix NVIDIA's checkpoints use; transformers >= 5 renames it to "model." on load
HF_PREFIXES = ("backbone.", "model.")  # accepted when reading an HF checkpoint


@dataclass(frozen=True, slots=True)
class Dims:
    """The sizes the mapping needs, read once from the model geometry."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mamba: geo.MambaWidths

    @classmethod
    def of(cls, cfg: ModelConfig) -> Dims:
        return cls(hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv_heads=cfg.num_kv_heads,
                   head_dim=cfg.head_dim, mamba=geo.mamba_widths(cfg))

    @property
    def in_proj_sizes(self) -> tuple[int, ...]:
        return tuple(rows for _, rows in self.mamba.in_proj_parts)

    @property
    def conv_sizes(self) -> tuple[int, ...]:
        return tuple(rows for _, rows in self.mamba.conv_parts)


Fn = Callable[[list], list]  # torch tensors in, torch tensors out


@dataclass(frozen=True, slots=True)
class TensorGroup:
    """Megatron keys and HF keys holding the same weights, and the exact maps between them."""

    meg_keys: tuple[str, ...]
    hf_keys: tuple[str, ...]
    to_hf: Fn
    to_megatron: Fn
    kind: str = "plain"  # "plain" | "vocab" (rows padded in megatron) | "ssm_fp32" (stored fp32 on both sides)
    #                      | "hf_fp32" (fp32 on the HF side only: NemotronH keeps its MoE gate in fp32)


def _identity(tensors: list) -> list:
    return list(tensors)


def _concat(tensors: list) -> list:
    import torch

    return [torch.cat(tensors, dim=0)]


def _splitter(sizes: tuple[int, ...]) -> Fn:
    def split(tensors: list) -> list:
        (full,) = tensors
        if full.shape[0] != sum(sizes):
            raise ValueError(f"expected {sum(sizes)} rows to split into {sizes}, got shape {tuple(full.shape)}")
        return [part.contiguous() for part in full.split(list(sizes), dim=0)]

    return split


def _qkv_maps(d: Dims) -> tuple[Fn, Fn]:
    per_group = d.heads // d.kv_heads  # query heads per group

    def to_hf(tensors: list) -> list:
        (qkv,) = tensors  # [ng * (np/ng + 2) * hn, H]
        w = qkv.view(d.kv_heads, per_group + 2, d.head_dim, -1)
        q = w[:, :per_group].reshape(d.heads * d.head_dim, -1)
        k = w[:, per_group].reshape(d.kv_heads * d.head_dim, -1)
        v = w[:, per_group + 1].reshape(d.kv_heads * d.head_dim, -1)
        return [q.contiguous(), k.contiguous(), v.contiguous()]

    def to_megatron(tensors: list) -> list:
        import torch

        q, k, v = tensors
        q = q.view(d.kv_heads, per_group, d.head_dim, -1)
        k = k.view(d.kv_heads, 1, d.head_dim, -1)
        v = v.view(d.kv_heads, 1, d.head_dim, -1)
        return [torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1]).contiguous()]

    return to_hf, to_megatron


def _one(meg: str, hf: str, kind: str = "plain") -> TensorGroup:
    return TensorGroup((meg,), (hf,), _identity, _identity, kind)


def _unstack(tensors: list) -> list:
    (stacked,) = tensors
    return [t.contiguous() for t in stacked.unbind(0)]


def _stack(tensors: list) -> list:
    import torch

    return [torch.stack(tensors, dim=0)]


def _zeros(n: int) -> Fn:
    def zeros(tensors: list) -> list:
        import torch

        return [torch.zeros(n, dtype=torch.float32, device=tensors[0].device if tensors else "cpu")]

    return zeros


def _moe_groups(meg: str, hf: str, cfg: ModelConfig) -> list[TensorGroup]:
    """A NemotronH ``moe`` layer: pre-norm, fp32 gate with its score-correction bias, experts, shared expert."""
    e, h = meg + "mlp.", hf + "mixer."
    experts = cfg.moe_num_experts
    bias = (_one(e + "router.expert_bias", h + "gate.e_score_correction_bias", "ssm_fp32") if cfg.moe_expert_bias
            # no expert bias in megatron: the HF correction bias is zero (routing on the plain scores)
            else TensorGroup((), (h + "gate.e_score_correction_bias",), _zeros(experts), lambda t: [], "hf_fp32"))
    return [
        _one(meg + "pre_mlp_layernorm.weight", hf + "norm.weight"),
        _one(e + "router.weight", h + "gate.weight", "hf_fp32"),  # [E, H]
        bias,
        TensorGroup((e + "experts.experts.linear_fc1.weight",),  # [E, Fe, H]
                    tuple(f"{h}experts.{j}.up_proj.weight" for j in range(experts)), _unstack, _stack),
        TensorGroup((e + "experts.experts.linear_fc2.weight",),  # [E, H, Fe]
                    tuple(f"{h}experts.{j}.down_proj.weight" for j in range(experts)), _unstack, _stack),
        _one(e + "shared_experts.linear_fc1.weight", h + "shared_experts.up_proj.weight"),  # [S, H]
        _one(e + "shared_experts.linear_fc2.weight", h + "shared_experts.down_proj.weight"),  # [H, S]
    ]


def layer_groups(i: int, symbol: str, d: Dims, cfg: ModelConfig | None = None) -> list[TensorGroup]:
    """The groups of layer ``i`` (global index, pipeline cuts removed); MoE layers need ``cfg``."""
    meg, hf = f"decoder.layers.{i}.", f"{HF_PREFIX}layers.{i}."
    if symbol == pat.MOE and cfg is not None:
        return _moe_groups(meg, hf, cfg)
    if symbol == pat.MAMBA:
        m, h = meg + "mixer.", hf + "mixer."
        return [
            _one(m + "in_proj.layer_norm_weight", hf + "norm.weight"),
            TensorGroup(
                tuple(f"{m}in_proj.weight.{p}" for p in IN_PROJ_PARTS),  # [D|D|G|G|h, H]
                (h + "in_proj.weight",),
                _concat,
                _splitter(d.in_proj_sizes),
            ),
            TensorGroup(
                tuple(f"{m}conv1d.weight.{p}" for p in CONV_PARTS),  # [D|G|G, 1, K]
                (h + "conv1d.weight",),
                _concat,
                _splitter(d.conv_sizes),
            ),
            TensorGroup(
                tuple(f"{m}conv1d.bias.{p}" for p in CONV_PARTS), (h + "conv1d.bias",), _concat, _splitter(d.conv_sizes)
            ),
            *(_one(m + name, h + name, "ssm_fp32") for name in SSM_FP32_NAMES),  # [h]
            _one(m + "norm.weight", h + "norm.weight"),  # gated RMSNorm [D]
            _one(m + "out_proj.weight", h + "out_proj.weight"),  # [H, D]
        ]
    if symbol == pat.ATTENTION:
        a, h = meg + "self_attention.", hf + "mixer."
        qkv_to_hf, qkv_to_meg = _qkv_maps(d)
        return [
            _one(a + "linear_qkv.layer_norm_weight", hf + "norm.weight"),
            TensorGroup(
                (a + "linear_qkv.weight",),
                (h + "q_proj.weight", h + "k_proj.weight", h + "v_proj.weight"),
                qkv_to_hf,
                qkv_to_meg,
            ),
            _one(a + "linear_proj.weight", h + "o_proj.weight"),
        ]
    if symbol == pat.MLP:
        p, h = meg + "mlp.", hf + "mixer."
        return [
            _one(p + "linear_fc1.layer_norm_weight", hf + "norm.weight"),
            _one(p + "linear_fc1.weight", h + "up_proj.weight"),  # [F, H]
            _one(p + "linear_fc2.weight", h + "down_proj.weight"),  # [H, F]
        ]
    raise ValueError(f"no NemotronH mapping for layer symbol {symbol!r}")


def model_groups(cfg: ModelConfig) -> list[TensorGroup]:
    """Every group of the model, in HF order: embeddings, layers, final norm, lm_head."""
    d = Dims.of(cfg)
    groups = [_one("embedding.word_embeddings.weight", HF_PREFIX + "embeddings.weight", "vocab")]
    for i, symbol in enumerate(pat.layers(cfg.hybrid_layer_pattern)):
        groups.extend(layer_groups(i, symbol, d, cfg))
    groups.append(_one("decoder.final_norm.weight", HF_PREFIX + "norm_f.weight"))
    groups.append(_one("output_layer.weight", "lm_head.weight", "vocab"))
    return groups


def expected_megatron_shapes(cfg: ModelConfig, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """The global shape of every megatron model key (what a training checkpoint holds), from the geometry;
    split parameters appear as their stored sub-keys."""
    shapes: dict[str, tuple[int, ...]] = {}
    params = [geo.embedding(cfg, padded_vocab), *geo.final_norm(cfg), geo.output_layer(cfg, padded_vocab)]
    keyed = [(p.name, p) for p in params]
    for i, layer in enumerate(geo.layers(cfg)):
        keyed += [(geo.layer_key(i, p.name), p) for p in layer.params if not p.expert]
        for fc in ("linear_fc1", "linear_fc2"):  # routed experts: one stacked tensor per projection
            first = [p for p in layer.params if p.expert and p.name == f"mlp.experts.{fc}.weight0"]
            if first:
                shapes[geo.layer_key(i, f"mlp.experts.experts.{fc}.weight")] = (cfg.moe_num_experts, *first[0].shape)
        if layer.symbol == pat.MOE and cfg.moe_expert_bias:
            shapes[geo.layer_key(i, "mlp.router.expert_bias")] = (cfg.moe_num_experts,)
    for key, p in keyed:
        if p.parts:
            for part, rows in p.parts:
                shapes[f"{key}.{part}"] = (rows, *p.shape[1:])
        else:
            shapes[key] = p.shape
    return shapes


def is_model_key(key: str) -> bool:
    """Whether a checkpoint key belongs to the model's weights (not optimizer, RNG or loader state)."""
    return key.startswith(("embedding.", "decoder.", "output_layer."))


def strip_hf_prefix(key: str) -> str:
    """Maps an HF key with either accepted prefix onto the one this module writes."""
    for prefix in HF_PREFIXES:
        if key.startswith(prefix):
            return HF_PREFIX + key[len(prefix) :]
    return key
