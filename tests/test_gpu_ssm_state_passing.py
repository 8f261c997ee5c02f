"""GPU: state-passing context parallelism for Mamba-2 with the real kernels (causal-conv1d, mamba-ssm's chunked
SSD scan). First the kernel callables against the token-by-token reference (their seq_idx and final-state
semantics are what the state passing relies on), then two CP ranks sharing the one GPU over gloo against the
whole sequence through the same kernels, forward and backward, then StatePassingMambaMixer on two CP ranks
against megatron's MambaMixer on the whole sequence with the same weights, on rows of one document and on packed
documents split one at a time, and what each mixer keeps for its backward against the dry run's memory model."""

from __future__ import annotations

from functools import partial

import pytest

from gloo_world import run_ranks
from saved_storages import SavedStorages
from state_passing_harness import KERNELS, body, inputs

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def strict_fp32_triton(tmp_path_factory):
    """The SSD kernels' fp32 ``tl.dot`` in IEEE fp32 for this module, compiled into a fresh cache (its key ignores
    the setting); the CP ranks fork from here and inherit it. Triton's default, TF32, put 1.8e-3 of the largest
    value between the scan and the fp32 reference on an H200: precision, not semantics (the interpreted test runs
    the same kernel code in fp32 to 6.4e-7). Restored after the module: later modules keep their own cache."""
    import os

    from hybrid_megatron.devtools.fixture_worker import strict_fp32_env

    saved = {k: os.environ.get(k) for k in ("TRITON_F32_DEFAULT", "TRITON_CACHE_DIR")}
    strict_fp32_env(tmp_path_factory.mktemp("triton_ieee"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_the_kernel_callables_compute_the_reference_recurrence():
    import torch

    from hybrid_megatron.model.ssm_state_passing import kernel_conv, kernel_scan, process_dt
    from ssd_reference import causal_conv, ssd_scan

    data = inputs(KERNELS, 2, packed=True)  # 128 tokens, four document starts in row 0, two in row 1
    seq_idx = data["seq_idx"]
    u = kernel_conv(data["conv_w"], data["conv_b"])(data["xbc"], seq_idx)
    u_ref = causal_conv(data["xbc"], data["conv_w"], data["conv_b"], seq_idx)
    assert float((u - u_ref).abs().max()) < 1e-5 * float(u_ref.abs().max())
    x, B, C = (t.contiguous() for t in KERNELS.dims.split(u_ref))
    args = (x, process_dt(data["dt"], data["dt_bias"]), -torch.exp(data["A_log"]), B, C, data["D"], seq_idx)
    (y, final), (y_ref, final_ref) = kernel_scan(KERNELS.scan_chunk)(*args), ssd_scan(*args)
    for got, want in ((y, y_ref), (final, final_ref)):  # the final state is the last document's, from zero
        assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


@pytest.mark.parametrize("zigzag, packed, documents", [(False, False, None), (True, True, None),
                                                       (True, True, [16, 8, 40, 32])],
                         ids=["contiguous", "zigzag-packed", "per-document"])
def test_two_cp_ranks_on_one_gpu_compute_the_whole_sequence(zigzag, packed, documents):
    results = run_ranks(partial(body, be=KERNELS, zigzag=zigzag, packed=packed, documents=documents), world=2, cp=2)
    for rank, r in results.items():
        rel = {k: v / max(r["scale"][k], 1e-12) for k, v in r["diff"].items()}
        print(rank, {k: f"{v:.1e}" for k, v in rel.items()})
        bad = {k: v for k, v in rel.items() if v > 1e-4}
        assert not bad, f"CP rank {rank} differs from the whole sequence (relative to its largest value): {bad}"


def _relative(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _grad_differences(stock, ours) -> dict[str, float]:
    """Each parameter's gradient, ours summed over the CP ranks (megatron's DP x CP reduction), against stock's."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    out = {}
    for (name, p_stock), (_, p_ours) in zip(stock.named_parameters(), ours.named_parameters()):
        dist.all_reduce(p_ours.grad, group=ps.get_context_parallel_group())
        out[name] = _relative(p_ours.grad, p_stock.grad)
    return out


def _mixers():
    """(run config, megatron's MambaMixer on a one-rank CP group, StatePassingMambaMixer on the CP group), with the
    same weights, from the tiny model at CP 2 with state passing (local spec)."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module

    from gpu_helpers import tiny_config
    from hybrid_megatron.model.build import build_transformer_config
    from hybrid_megatron.model.mamba_cp_mixer import own_group
    from hybrid_megatron.model.specs import local_stack_spec

    cfg = tiny_config("data.reset_at_document_boundaries=false", "parallel.context_parallel_size=2",
                      "parallel.mamba_context_parallel=state_passing", "model.layer_spec=local")
    config = build_transformer_config(cfg)

    def mixer(state_passing: bool, cp_group):
        pgs = ProcessGroupCollection()
        pgs.tp, pgs.cp = ps.get_tensor_model_parallel_group(), cp_group
        model_parallel_cuda_manual_seed(0)
        spec = local_stack_spec(cfg.model, state_passing).submodules.mamba_layer.submodules.mixer
        return build_module(spec, config, d_model=config.hidden_size, layer_number=1, pg_collection=pgs)

    stock, ours = mixer(False, own_group()), mixer(True, ps.get_context_parallel_group())
    ours.load_state_dict(stock.state_dict())
    return cfg, stock, ours


def _mixer_body(rank: int, out) -> None:
    """megatron's MambaMixer over the whole sequence against StatePassingMambaMixer on this CP rank's zigzag share,
    with the same weights: outputs and parameter gradients (summed over CP, as megatron's DP x CP reduction)."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    torch.cuda.set_device(0)
    cfg, stock, ours = _mixers()
    hidden_size = cfg.model.hidden_size
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(2, 256, hidden_size, device="cuda", generator=g, dtype=torch.bfloat16)  # [b, l, h]
    weights = torch.randn(2, 256, hidden_size, device="cuda", generator=g, dtype=torch.bfloat16)
    share = get_batch_on_this_cp_rank({"h": hidden, "w": weights, "y": None, "cu_seqlens": None}, is_hybrid_cp=False,
                                      cp_group=ps.get_context_parallel_group())
    y_full, _ = stock(hidden.transpose(0, 1).contiguous())
    (y_full * weights.transpose(0, 1)).float().sum().backward()
    y_share, _ = ours(share["h"].transpose(0, 1).contiguous())
    (y_share * share["w"].transpose(0, 1)).float().sum().backward()
    full = y_full.detach().transpose(0, 1).contiguous()
    y_full_share = get_batch_on_this_cp_rank({"y": full, "cu_seqlens": None}, is_hybrid_cp=False,
                                             cp_group=ps.get_context_parallel_group())["y"]
    out[rank] = {"y": _relative(y_share.detach().transpose(0, 1), y_full_share), "grads": _grad_differences(stock, ours)}


def _packed_mixer_body(rank: int, out) -> None:
    """Packed documents (thd, one row of four documents padded to multiples of 16): megatron's MambaMixer over the
    whole row against StatePassingMambaMixer on this CP rank's per-document share, taken by Transformer Engine's
    ``thd_get_partitioned_indices`` (what megatron's CP batch split calls)."""
    import torch
    import transformer_engine_torch as tex
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams

    torch.cuda.set_device(0)
    cfg, stock, ours = _mixers()
    lengths, total = [48, 16, 112, 80], 256
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                             cu_seqlens_kv_padded=cu, max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths),
                             total_tokens=total)
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(total, 1, cfg.model.hidden_size, device="cuda", generator=g, dtype=torch.bfloat16)
    weights = torch.randn(total, 1, cfg.model.hidden_size, device="cuda", generator=g, dtype=torch.bfloat16)
    index = tex.thd_get_partitioned_indices(cu, total, ps.get_context_parallel_world_size(),
                                            ps.get_context_parallel_rank())
    y_full, _ = stock(hidden, packed_seq_params=params)
    (y_full * weights).float().sum().backward()
    y_share, _ = ours(hidden[index].contiguous(), packed_seq_params=params)
    (y_share * weights[index]).float().sum().backward()
    out[rank] = {"y": _relative(y_share.detach(), y_full.detach()[index]), "grads": _grad_differences(stock, ours)}


@pytest.mark.parametrize("body", [_mixer_body, _packed_mixer_body], ids=["rows", "packed-documents"])
def test_the_state_passing_mixer_on_two_cp_ranks_matches_megatrons_mixer_on_the_whole_sequence(body):
    results = run_ranks(body, world=2, cp=2)
    for rank, r in results.items():
        print(rank, r)
        bad = {k: v for k, v in {"y": r["y"], **r["grads"]}.items() if v > 2e-2}
        assert not bad, f"CP rank {rank}: relative differences from megatron's mixer (bf16): {bad}"


def _memory_body(rank: int, out) -> None:
    """What each mixer keeps for its backward against the dry run's memory model (model/memory.py)."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    from hybrid_megatron.model.memory import mamba_mixer_stored

    torch.cuda.set_device(0)
    cfg, stock, ours = _mixers()
    b, length = 2, 256
    hidden = torch.randn(length, b, cfg.model.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    share = get_batch_on_this_cp_rank({"h": hidden.detach().transpose(0, 1), "cu_seqlens": None}, is_hybrid_cp=False,
                                      cp_group=ps.get_context_parallel_group())["h"].transpose(0, 1).contiguous()
    share.requires_grad_()
    measured = {}
    for name, mixer, x in (("fused", stock, hidden), ("state_passing", ours, share)):
        saved = SavedStorages([*mixer.parameters(), x])
        with saved.hooks():
            mixer(x)
        measured[name] = saved.bytes
    model = {"fused": mamba_mixer_stored(cfg.model, b * length, 1),
             "state_passing": mamba_mixer_stored(cfg.model, b * length // 2, 1, 2 * 2, b)}
    out[rank] = {k: (measured[k], model[k]) for k in measured}


def test_the_memory_model_counts_what_each_mamba_mixer_keeps_for_its_backward():
    for rank, r in run_ranks(_memory_body, world=2, cp=2).items():
        print(rank, {k: f"measured {got:,} B, modelled {want:,.0f} B" for k, (got, want) in r.items()})
        bad = {k: got / want for k, (got, want) in r.items() if abs(got / want - 1) > 0.1}
        assert not bad, f"CP rank {rank}: measured / modelled bytes off by more than 10%: {bad}"
