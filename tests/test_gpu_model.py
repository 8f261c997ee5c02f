"""GPU: the real megatron-core HybridModel built from our specs (needs CUDA + mamba-ssm + causal-conv1d)."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_helpers import init_single_process, tiny_config

pytestmark = pytest.mark.gpu

VOCAB = 257
SEQ = 384  # longer than one SSD chunk (128) and not a multiple of the attention block sizes


@pytest.fixture(scope="module")
def world():
    init_single_process()
    yield


def _batch(cfg, n=4, seq=SEQ, seed=0):
    from data_pipeline.loader import StepBatch
    from data_pipeline.packing import build_arrays

    rng = np.random.default_rng(seed)
    windows = rng.integers(0, VOCAB - 1, size=(n, seq + 1)).astype(np.int64)
    windows[:, 100] = VOCAB - 1  # a document boundary (EOS) inside every row
    arrays = build_arrays(windows, VOCAB - 1, reset=True, eod_mask_loss=False)
    return StepBatch(step=0, phase="pretrain", seq_len=seq, sources=["x"] * n, hashes=[""] * n,
                     tokens_by_source={"x": n * seq}, **arrays)


def _build(cfg):
    from hybrid_megatron.training.lr import PhasedScheduler, Segment
    from hybrid_megatron.training.optimizer import build_optimizer
    from hybrid_megatron.training.setup import build_training_model

    model = build_training_model(cfg, VOCAB, SEQ)
    optimizer = build_optimizer(cfg, model)
    # no warmup, so the first step already moves the weights
    scheduler = PhasedScheduler(optimizer, [Segment(0, 100, 0.0, cfg.optim.lr, 0.0, 0, "linear")], 0.1)
    return model, optimizer, scheduler


@pytest.mark.parametrize("spec", ["te", "local"])
def test_parameter_count_matches_dry_run(world, spec):
    from hybrid_megatron.model.build import build_model_chunks, padded_vocab_size
    from hybrid_megatron.model.flops import num_parameters

    if spec == "te":
        pytest.importorskip("transformer_engine.pytorch", reason="needs Transformer Engine")
    cfg = tiny_config(f"model.layer_spec={spec}")
    chunks = build_model_chunks(cfg, VOCAB, SEQ)
    built = sum(p.numel() for c in chunks for p in c.parameters())
    assert built == num_parameters(cfg.model, padded_vocab_size(VOCAB, cfg.model, 1))


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_ssm_params_stay_fp32_through_wrap_step_and_checkpoint(world, tmp_path, precision):
    """bf16, and FP8 (tensorwise, the FP8 issue's default) on top of it: A_log, D, dt_bias stay fp32."""
    import torch

    from hybrid_megatron.model.fp32_params import ssm_fp32_params
    from hybrid_megatron.checkpoint.live import Checkpointer
    from hybrid_megatron.training.step import train_step

    extra = []
    if precision == "fp8":
        pytest.importorskip("transformer_engine.pytorch", reason="FP8 needs Transformer Engine")
        extra = ["precision.fp8=hybrid", "precision.fp8_recipe=tensorwise"]
    cfg = tiny_config(f"checkpoint.save_dir={tmp_path}", *extra)
    model, optimizer, scheduler = _build(cfg)
    ssm = ssm_fp32_params(model[0])
    assert len(ssm) == 3 * 4  # A_log, D, dt_bias in each of the 4 Mamba layers
    assert {str(p.dtype) for p in ssm.values()} == {"torch.float32"}
    others = [p for n, p in model[0].named_parameters() if n not in ssm]
    assert {p.dtype for p in others} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in ssm.items()}

    result = train_step(_batch(cfg), model, optimizer, scheduler, cfg, SEQ)
    assert not result.skipped and np.isfinite(result.loss)
    after = ssm_fp32_params(model[0])
    assert {str(p.dtype) for p in after.values()} == {"torch.float32"}
    moved = [n for n in after if not torch.equal(after[n], before[n])]
    assert moved, "the optimizer step did not update any SSM parameter"
    # fp32 updates smaller than bf16 resolution survive (they would round away in bf16)
    a_log = next(n for n in after if n.endswith("A_log"))
    delta = (after[a_log] - before[a_log]).abs()
    assert (delta[delta > 0] < before[a_log].abs()[delta > 0] * 2**-8).any()

    Checkpointer(cfg, model, optimizer, scheduler).save(1, {"step": 1, "data": {}, "world_size": 1})
    saved = {n: p.detach().clone() for n, p in after.items()}
    model2, optimizer2, scheduler2 = _build(cfg)
    Checkpointer(cfg, model2, optimizer2, scheduler2).load(tmp_path / "step-000001")
    loaded = ssm_fp32_params(model2[0])
    for name, value in saved.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], value), name


def test_model_loaded_for_inference_matches_the_trained_model(world, tmp_path):
    """training/inference.py: a checkpoint built back outside the loop gives the trained model's logits."""
    import torch

    from hybrid_megatron.checkpoint.live import Checkpointer
    from hybrid_megatron.config_io import to_dict
    from hybrid_megatron.model.fp32_params import ssm_fp32_params
    from hybrid_megatron.training.inference import load_model_for_inference, run_config_of_checkpoint
    from hybrid_megatron.training.step import train_step

    cfg = tiny_config(f"checkpoint.save_dir={tmp_path}")
    model, optimizer, scheduler = _build(cfg)
    assert not train_step(_batch(cfg), model, optimizer, scheduler, cfg, SEQ).skipped
    Checkpointer(cfg, model, optimizer, scheduler).save(1, {"step": 1, "data": {}, "world_size": 1})

    step_dir, saved_cfg = run_config_of_checkpoint(tmp_path)
    assert step_dir.name == "step-000001" and to_dict(saved_cfg.model) == to_dict(cfg.model)
    loaded = load_model_for_inference(saved_cfg, step_dir, max_seq_len=SEQ)
    (chunk,) = loaded.chunks
    assert not chunk.training and {p.dtype for p in ssm_fp32_params(chunk).values()} == {torch.float32}
    batch = _batch(cfg, n=2, seed=3)
    ids = torch.from_numpy(batch.input_ids).cuda()
    pos = torch.arange(SEQ, device="cuda").expand(2, SEQ).contiguous()
    trained = model[0].module.eval()  # below DDP: the bf16 wrap with fp32 SSM params
    with torch.no_grad():
        want, got = trained(ids, pos, attention_mask=None), chunk(ids, pos, attention_mask=None)
    assert got.shape == want.shape and torch.equal(got, want)


def _fill_grads(model, seed: int, poison: bool = False) -> None:
    """Fixed gradients in the DDP grad buffers, as a backward pass would leave them (DP = 1: no reduce)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    for chunk in model:
        chunk.zero_grad_buffer()
        for p in chunk.parameters():
            p.main_grad.copy_(torch.randn(p.shape, device="cuda", generator=g))
    if poison:
        next(model[0].parameters()).main_grad.view(-1)[0] = float("nan")


def test_optimizer_step_changes_weights_as_megatrons_step_and_skips_non_finite(world):
    """step.optimizer_step (the norm taken once) against megatron's own ``optimizer.step()`` from the
    same weights and gradients, the clip engaged (norm >> clip_grad), on the optimizer that our param
    groups build (fp32 SSM params included): bitwise the same weights and norms. A NaN gradient then skips the update, leaves the
    weights as they were and the Adam state clean (the next step's weights are finite)."""
    import torch

    from hybrid_megatron.training.step import optimizer_step

    cfg = tiny_config()
    runs = {}
    for path in ("ours", "megatron"):
        init_single_process(seed=7)  # the same initial weights for both paths
        model, optimizer, _ = _build(cfg)
        start = [p.detach().clone() for p in model[0].parameters()]
        norms = []
        for seed in range(2):
            optimizer.zero_grad()
            _fill_grads(model, seed)
            if path == "ours":
                norm, skipped = optimizer_step(optimizer, 1.0)
                assert not skipped
            else:
                ok, norm, _ = optimizer.step()
                assert ok
            norms.append(float(norm))
        runs[path] = (start, norms, [p.detach().clone() for p in model[0].parameters()], (model, optimizer))
    (start, norms, after, (model, optimizer)), (ref_start, ref_norms, ref_after, _) = runs["ours"], runs["megatron"]
    assert all(torch.equal(a, b) for a, b in zip(start, ref_start)), "the two builds did not start alike"
    assert norms == ref_norms and min(norms) > 10 * cfg.optim.clip_grad
    assert any(not torch.equal(a, b) for a, b in zip(after, start)), "the steps did not move the weights"
    assert all(torch.equal(a, b) for a, b in zip(after, ref_after))

    optimizer.zero_grad()
    _fill_grads(model, 2, poison=True)
    norm, skipped = optimizer_step(optimizer, 1.0)
    assert skipped and not np.isfinite(norm)
    assert all(torch.equal(p, a) for p, a in zip(model[0].parameters(), after))
    optimizer.zero_grad()
    _fill_grads(model, 3)
    assert optimizer_step(optimizer, 1.0)[1] is False
    moved = [p.detach().clone() for p in model[0].parameters()]
    assert all(torch.isfinite(p).all() for p in moved)
    optimizer.zero_grad()
    _fill_grads(model, 4)  # finite gradients, non-finite loss: skipped too
    assert optimizer_step(optimizer, float("inf"))[1] is True
    assert all(torch.equal(p, a) for p, a in zip(model[0].parameters(), moved))


def test_te_and_local_specs_compute_the_same_loss(world):
    """Same weights through both specs (checkpoint keys are shared): fp32 losses agree.

    Entries are matched by their checkpoint key (``ShardedTensor.key``), not by the module path: the
    local spec's separate norms (``norm.weight``, ``input_layernorm.weight``) map to TE's fused
    ``*.layer_norm_weight`` through ``sharded_state_dict_keys_map``, as in a checkpoint."""
    import torch

    pytest.importorskip("transformer_engine.pytorch", reason="needs Transformer Engine")
    from hybrid_megatron.model.build import build_model_chunks
    from hybrid_megatron.training.step import forward_step, split_micro_batches

    losses = {}
    state = None
    for spec in ("te", "local"):
        cfg = tiny_config(f"model.layer_spec={spec}", "precision.dtype=fp32")
        (model,) = build_model_chunks(cfg, VOCAB, SEQ)
        # ShardedTensor.data: the parameter itself; TE's byte-serialized ``_extra_state`` is no weight
        tensors = {v.key: v.data for v in model.sharded_state_dict().values()
                   if torch.is_tensor(getattr(v, "data", None)) and v.data.is_floating_point()}
        if state is None:
            with torch.no_grad():  # norms start at 1 in both specs: move them, so an unmatched norm shows
                g = torch.Generator(device="cuda").manual_seed(0)
                for k, t in tensors.items():
                    if "norm" in k:
                        t.add_(0.1 * torch.randn(t.shape, device=t.device, generator=g).to(t.dtype))
            state = {k: t.detach().clone() for k, t in tensors.items()}
        else:
            assert set(state) >= set(tensors), sorted(set(tensors) - set(state))
            with torch.no_grad():
                for k, t in tensors.items():
                    t.copy_(state[k])
            covered = {t.untyped_storage().data_ptr() for t in tensors.values()}
            missed = [n for n, p in model.named_parameters() if p.untyped_storage().data_ptr() not in covered]
            assert not missed, f"local-spec parameters without a TE counterpart: {missed}"
        model.eval()
        # unpacked: TE's fp32 attention has no fused kernel for packed (thd) input
        (mb,) = split_micro_batches(_batch(cfg, n=2), 2, False, "cuda")
        with torch.no_grad():
            out, loss_fn = forward_step(iter([mb]), model)
            loss_sum, tokens, _ = loss_fn(out)
        losses[spec] = (loss_sum / tokens).item()
    assert losses["te"] == pytest.approx(losses["local"], rel=1e-3)


def test_bf16_mamba_projections_skip_fp8_inside_an_fp8_region(world):
    """With fp8_mamba_projections_bf16 the Mamba in_proj computes exactly its BF16 result under FP8
    autocast; the default in_proj (and the attention/MLP linears) do not."""
    import torch

    te = pytest.importorskip("transformer_engine.pytorch", reason="needs Transformer Engine")
    from transformer_engine.common.recipe import Float8CurrentScaling, Format

    from hybrid_megatron.model.build import build_model_chunks

    autocast = getattr(te, "autocast", None) or te.fp8_autocast
    recipe_kw = "recipe" if hasattr(te, "autocast") else "fp8_recipe"
    recipe = Float8CurrentScaling(fp8_format=Format.HYBRID)
    x = torch.randn(SEQ, 2, 512, device="cuda", dtype=torch.bfloat16)
    results = {}
    for flag in (False, True):
        cfg = tiny_config("precision.fp8=hybrid", f"precision.fp8_mamba_projections_bf16={str(flag).lower()}")
        (model,) = build_model_chunks(cfg, VOCAB, SEQ)
        layers = list(model.decoder.layers)
        in_proj = next(layer for layer in layers if type(layer).__name__ == "MambaLayer").mixer.in_proj
        mlp_fc1 = next(layer for layer in layers if type(layer).__name__ == "MLPLayer").mlp.linear_fc1
        assert type(in_proj).__name__ == ("BF16TELayerNormColumnParallelLinear" if flag else
                                          "TELayerNormColumnParallelLinear")
        with torch.no_grad():
            plain = in_proj(x)[0]
            plain_fc1 = mlp_fc1(x)[0]
            with autocast(enabled=True, **{recipe_kw: recipe}):
                under_fp8 = in_proj(x)[0]
                fc1_fp8 = mlp_fc1(x)[0]
        results[flag] = torch.equal(plain, under_fp8)
        assert not torch.equal(plain_fc1, fc1_fp8), "the MLP must still run FP8"
    assert results == {False: False, True: True}


def test_deterministic_conv1d_grads_match_the_cuda_kernel():
    """model/deterministic_conv.py against causal-conv1d's own backward on the layout mamba-ssm uses
    (channel-last [B, D, L] views, bf16, packed documents): same sums up to fp32 order, repeatable bitwise."""
    import torch
    from causal_conv1d.cpp_functions import causal_conv1d_bwd_function

    from hybrid_megatron.model import deterministic_conv

    g = torch.Generator(device="cuda").manual_seed(0)
    bsz, length, dim, width = 2, 1000, 1280, 4
    x = torch.randn(bsz, length, dim, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    dout = torch.randn(bsz, length, dim, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    weight = torch.randn(dim, width, device="cuda", dtype=torch.bfloat16, generator=g) * 0.3
    bias = torch.randn(dim, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    seq_idx = (torch.arange(length, device="cuda") // 137).to(torch.int32).expand(bsz, length).contiguous()
    _, k_w, k_b, *_ = causal_conv1d_bwd_function(x, weight, bias, dout, seq_idx, None, None, None, False, True)
    d_w, d_b = deterministic_conv.conv1d_param_grads(x, weight, bias, dout, seq_idx, True)
    # the kernel sums in fp32 and returns bf16 (as the weight): equal up to that rounding (2^-9 relative)
    assert k_w.dtype == k_b.dtype == torch.bfloat16
    torch.testing.assert_close(d_w, k_w.float(), rtol=2**-8, atol=1e-3)
    torch.testing.assert_close(d_b, k_b.float(), rtol=2**-8, atol=1e-3)
    _, w16, b16, *_ = deterministic_conv.wrap_backward(causal_conv1d_bwd_function)(
        x, weight, bias, dout, seq_idx, None, None, None, False, True)
    assert torch.equal(w16, d_w.bfloat16()) and torch.equal(b16, d_b.bfloat16())
    again_w, again_b = deterministic_conv.conv1d_param_grads(x, weight, bias, dout, seq_idx, True)
    assert torch.equal(again_w, d_w) and torch.equal(again_b, d_b)
    assert deterministic_conv.install()
    import mamba_ssm.ops.triton.ssd_combined as fused

    assert fused.causal_conv1d_bwd_function.wrapped is not None
