"""The non-TE spec's core attention (model/attention.py) on a CPU: torch SDPA is the same code on every
device, so the packed-document masking and GQA are checked here against plain per-document attention."""

from __future__ import annotations

import math

import pytest
import torch

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from hybrid_megatron.model.attention import SDPAttention

HEADS, GROUPS, D = 4, 2, 16


@pytest.fixture(scope="module")
def attention():
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * D, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, attention_dropout=0.0, hidden_dropout=0.0)
    return SDPAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self").eval()


def _reference(q_SHD, k_SGD, v_SGD):
    """Causal softmax attention of one sequence, written out; GQA by repeating each KV group."""
    rep = HEADS // GROUPS
    k, v = k_SGD.repeat_interleave(rep, dim=1), v_SGD.repeat_interleave(rep, dim=1)
    s = q_SHD.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q_SHD, k) / math.sqrt(D)
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(s, HEADS * D)


def _qkv(s, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, HEADS, D, generator=g), torch.randn(s, b, GROUPS, D, generator=g),
            torch.randn(s, b, GROUPS, D, generator=g))


def test_unpacked_rows_are_causal_per_row(attention):
    q, k, v = _qkv(9, 2)
    out = attention(q, k, v, attention_mask=None)
    assert out.shape == (9, 2, HEADS * D)
    for row in range(2):
        torch.testing.assert_close(out[:, row], _reference(q[:, row], k[:, row], v[:, row]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cu", [[0, 5, 12], [0, 3, 4, 12], [0, 5, 9]])  # the last: 3 tokens past the last boundary
def test_packed_documents_do_not_attend_across_boundaries(attention, cu):
    q, k, v = _qkv(12, 1, seed=1)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t,
                             max_seqlen_q=12, max_seqlen_kv=12)
    out = attention(q, k, v, attention_mask=None, packed_seq_params=params)[:, 0]
    bounds = cu if cu[-1] == 12 else [*cu, 12]
    for a, b in zip(bounds, bounds[1:]):
        torch.testing.assert_close(out[a:b], _reference(q[a:b, 0], k[a:b, 0], v[a:b, 0]), rtol=1e-5, atol=1e-5)
