"""megatron's MambaMixer with state-passing context parallelism (``model/ssm_state_passing.py``) in place of its
all-to-all over heads, chosen by ``parallel.mamba_context_parallel: state_passing``.

The mixer keeps megatron's parameters, projections, checkpoint keys and gated norm; only the conv and the scan
change (``ssm_core``, a function of tensors so that it runs without building the mixer). Its own
``MambaContextParallel`` gets a one-rank group, so megatron neither exchanges heads nor slices parameters by CP
rank (nor caps CP by the heads); the real CP group goes to the state passing, which takes each
rank's share of the sequence in megatron's load-balancing zigzag (the layout of its CP batch split). The conv and
the scan run as separate kernels (causal-conv1d, mamba-ssm's chunked scan with the D skip) rather than megatron's
fused memory-efficient one, so a layer keeps more activations for the backward pass; the output gate runs inside
megatron's gated RMSNorm (mamba-ssm's kernel, fp32 inside, as the fused path gates in fp32), which keeps only its
input and z.

Packed documents come in megatron's per-document split (``Layout.documents``); every chunk of a document must
hold the conv's halo, so the config asks for documents padded to at least 2 x CP x (conv kernel - 1) tokens.
Not covered: inference (eval refuses CP > 1), ``D`` per head dimension (megatron's ``D_has_hdim``).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.ssm.mamba_mixer import MambaMixer

from hybrid_megatron.model.ssm_state_passing import (Dims, Layout, kernel_conv, kernel_scan, mamba_state_passing,
                                                     process_dt)

_OWN_GROUP = None


def own_group():
    """A process group of this rank alone (created once, collectively: every rank calls this at model build)."""
    global _OWN_GROUP
    if _OWN_GROUP is None:
        _OWN_GROUP, _ = dist.new_subgroups(group_size=1)
    return _OWN_GROUP


class StatePassingMambaMixer(MambaMixer):
    """MambaMixer whose training forward passes the SSM state between CP ranks instead of exchanging heads."""

    def __init__(self, *args, pg_collection, **kwargs) -> None:
        # megatron's own MambaContextParallel gets a one-rank group: it would split heads (and refuse a CP beyond
        # them); the real CP group is the state passing's
        own = copy.copy(pg_collection)
        own.cp = own_group()
        super().__init__(*args, pg_collection=own, **kwargs)
        if self.D_has_hdim:
            raise ValueError("state-passing context parallelism takes D per head (megatron's D_has_hdim=False)")
        if not self.use_mem_eff_path:
            raise ValueError("state-passing context parallelism replaces megatron's training path "
                             "(use_mamba_mem_eff_path=True); its other path is inference's")
        self.state_passing_group = pg_collection.cp

    def _ssm_training(self, zxBCdt: torch.Tensor, packed_seq_params=None) -> torch.Tensor:
        """[l, b, z | x B C | dt] (this rank's share of every sequence) -> the gated, normed [l, b, d_inner]. Rows
        of one document come in megatron's zigzag of 2 x CP chunks; packed documents (thd, b = 1) in its
        per-document split, read from the micro-batch's padded cu_seqlens."""
        dims = Dims(heads=self.nheads_local_tp, head_dim=self.headdim, groups=self.ngroups_local_tp,
                    state=self.d_state, conv_kernel=self.d_conv)
        group = self.state_passing_group
        if packed_seq_params is None:
            layout = Layout.rows(group.size(), True, zxBCdt.shape[0])
            seq_idx = torch.zeros(zxBCdt.shape[1::-1], dtype=torch.int32, device=zxBCdt.device)  # a document a row
        else:
            layout, seq_idx = _document_layout(packed_seq_params, group, zxBCdt.device)
        return ssm_core(zxBCdt, dims, self.dt_bias, self.A_log, self.D, layout, seq_idx, group,
                        conv=kernel_conv(self.conv1d_weight.squeeze(1), self.conv1d_bias, self.activation),
                        scan=kernel_scan(self.chunk_size), norm=self.norm if self.rmsnorm else None)

    def _ssm_prefill(self, *args, **kwargs):
        if self.state_passing_group.size() > 1:
            raise ValueError("state-passing context parallelism runs training only; run inference with CP 1")
        return super()._ssm_prefill(*args, **kwargs)


def ssm_core(zxBCdt: torch.Tensor, dims: Dims, dt_bias: torch.Tensor, A_log: torch.Tensor, D: torch.Tensor,
             layout: Layout, seq_idx: torch.Tensor, group, *, conv, scan, norm=None) -> torch.Tensor:
    """[l, b, z | x B C | dt] (this rank's share of every sequence, ``layout``'s chunks) -> [l, b, d_inner]: the
    state-passing conv and scan, then the output gate, inside ``norm`` when given (megatron's gated RMSNorm with
    norm_before_gate=False computes norm(y * silu(z)) in one kernel) or as y * silu(z)."""
    d_inner = dims.heads * dims.head_dim
    z, xbc, dt = torch.split(zxBCdt.transpose(0, 1), [d_inner, dims.channels, dims.heads], dim=-1)  # b l d views
    y = mamba_state_passing(xbc.contiguous(), process_dt(dt, dt_bias), seq_idx, -torch.exp(A_log.float()), D, dims,
                            layout=layout, group=group, conv=conv, scan=scan)
    y = y.flatten(-2).transpose(0, 1).contiguous()  # b l d -> l b d
    z = z.transpose(0, 1)  # a view of the in_proj output, which the backward keeps anyway
    return norm(y, z) if norm is not None else y * F.silu(z)


def _document_layout(packed_seq_params, group, device) -> tuple[Layout, torch.Tensor]:
    """The per-document layout of a packed micro-batch (its documents from the whole micro-batch's padded
    cu_seqlens: one host read per layer) and this rank's document ids, [1, local tokens]."""
    cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        raise ValueError("packed documents under context parallelism need the padded cu_seqlens (training/step.cp_share)")
    doc_lengths = torch.diff(cu).tolist()
    layout = Layout.documents(group.size(), doc_lengths)
    ids = layout.ids[group.rank()]
    docs = torch.tensor([k // (2 * group.size()) for k in ids], device=device)
    sizes = torch.tensor([layout.lengths[k] for k in ids], device=device)
    return layout, torch.repeat_interleave(docs, sizes).to(torch.int32)[None]
