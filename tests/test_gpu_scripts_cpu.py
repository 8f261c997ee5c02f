"""CPU checks of the GPU scripts: case configs, FLOPs/MFU math, result JSON, the fixture format, the driver.

The GPU parts (model builds, timed steps, megatron forwards) run only on the GPU machine; what is
checked here is everything those runs depend on that does not need a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import train_throughput as T
from hybrid_megatron.devtools import REPO_ROOT as ROOT
from hybrid_megatron.devtools import bench as C
from hybrid_megatron.devtools.throughput_paths import synthetic_batches
from hybrid_megatron.training.environment import versions
from hybrid_megatron.devtools import fixture_spec as FS
from hybrid_megatron.devtools import fixture_worker as W
from hybrid_megatron.model import pattern as pat
from tools import make_convert_fixtures as F


# ---- benchmark cases and configs ------------------------------------------------------------------


def test_default_cases_cover_both_models_precisions_and_paths():
    cases = C.parse_cases("default")
    assert {(c.model, c.precision, c.path) for c in cases} == {
        (m, p, path) for m in ("hybrid1b", "attn1b") for p in ("bf16", "fp8") for path in ("ours", "stock")
    }
    assert [c.name for c in C.parse_cases("hybrid1b-fp8-stock, fp8_7b")][:2] == ["hybrid1b-fp8-stock", "hybrid7bl-bf16-ours"]


@pytest.mark.parametrize("bad", ["hybrid1b-fp16-ours", "gpt-bf16-ours", "hybrid1b-bf16", "", " , "])
def test_bad_case_names_are_refused(bad):
    with pytest.raises(ValueError, match="--cases"):
        C.parse_cases(bad)


@pytest.mark.parametrize("model", ["hybrid1b", "attn1b"])
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_case_configs_are_valid_1b_models(model, precision):
    cfg = C.run_config(model, precision, 4096, 2, 4)
    numbers = C.model_numbers(cfg, 4096)
    assert 0.9e9 < numbers["params"] < 1.3e9
    assert cfg.model.hidden_size == 2048 and cfg.model.vocab_size == numbers["padded_vocab"]
    assert cfg.data.reset_at_document_boundaries is False and cfg.precision.fp32_ssm_params
    # megatron's stock spec passes no mixer params: ours must use MambaMixer's defaults to match
    assert (cfg.model.mamba_chunk_size, cfg.model.mamba_conv_kernel, cfg.model.mamba_expand) == (128, 4, 2)
    if precision == "fp8":
        assert (cfg.precision.fp8, cfg.precision.fp8_recipe) == ("hybrid", "tensorwise")
    else:
        assert cfg.precision.fp8 is None


def test_hybrid_has_one_attention_per_eight_sequence_mixers():
    counts = pat.count_layers(C.MODELS["hybrid1b"]["hybrid_layer_pattern"])
    assert counts["mamba"] == 7 * counts["attention"] and counts["attention"] >= 2
    assert pat.count_layers(C.MODELS["attn1b"]["hybrid_layer_pattern"])["mamba"] == 0


def test_fp8_bf16_ends_reach_the_config():
    cfg = C.run_config("hybrid1b", "fp8", 4096, 2, 4, fp8_bf16_ends=2)
    assert (cfg.precision.fp8_bf16_layers_at_start, cfg.precision.fp8_bf16_layers_at_end) == (2, 2)
    with pytest.raises(ValueError, match="multiple"):
        C.run_config("hybrid1b", "bf16", 4096, 3, 4)


def test_scaling_plan_keeps_tokens_per_step_and_micro_batch():
    args = T.parse_args(["--scaling"])
    specs = T.plan(args)
    assert {s["seq_len"] for s in specs} == set(C.SCALING_SEQS)
    assert {s["model"] for s in specs} == set(C.SCALING_MODELS)
    assert {s["global_batch"] * s["seq_len"] for s in specs} == {args.step_tokens}
    assert {s["micro_batch_size"] * s["seq_len"] for s in specs} == {args.micro_tokens}
    assert (args.steps, args.warmup) == (8, 3)
    for spec in specs:
        T.spec_config(spec, args)  # every config validates on the CPU
    with pytest.raises(ValueError, match="--scaling"):
        T.plan(T.parse_args(["--scaling", "--scaling-seqs", "3000"]))


def test_set_overrides_reach_our_cases_and_refuse_stock_ones(capsys):
    args = T.parse_args(["--cases", "hybrid1b-bf16-ours", "--set", "model.mamba_chunk_size=256"])
    (spec,) = T.plan(args)
    assert spec["name"] == "hybrid1b-bf16-ours[model.mamba_chunk_size=256]"
    assert T.spec_config(spec, args).model.mamba_chunk_size == 256
    assert T.main(["--list", "--cases", "hybrid1b-bf16-stock", "--set", "model.mamba_chunk_size=256"]) == 2
    assert "stock" in capsys.readouterr().err
    assert T.main(["--list", "--cases", "hybrid1b-bf16-ours", "--set", "model.nope=1"]) == 2
    assert "model.nope" in capsys.readouterr().err


def test_packed_batches_reset_at_document_starts_and_reach_the_config():
    args = T.parse_args(["--cases", "hybrid1b-bf16-ours,hybrid1b-bf16-stock", "--packed", "512"])
    specs = T.plan(args)
    assert [s["name"] for s in specs] == ["hybrid1b-bf16-ours-packed512", "hybrid1b-bf16-stock-packed512"]
    assert T.spec_config(specs[0], args).data.reset_at_document_boundaries
    assert not T.spec_config(T.plan(T.parse_args([]))[0], T.parse_args([])).data.reset_at_document_boundaries
    (batch,) = synthetic_batches(1, 4, 4096, 32000, doc_tokens=512)
    eos = 32000 - 1
    starts = (batch.input_ids[:, :-1] == eos).sum()
    assert 16 < starts < 64  # ~4 * 4096 / 512 documents
    assert (batch.seq_idx[:, -1] == (batch.input_ids[:, :-1] == eos).sum(axis=1)).all()
    (plain,) = synthetic_batches(1, 4, 4096, 32000)
    assert not plain.seq_idx.any() and not (plain.input_ids == eos).any()
    with pytest.raises(SystemExit):
        T.parse_args(["--packed", "1"])


def test_default_args_and_list():
    args = T.parse_args([])
    assert (args.steps, args.warmup, args.seq, args.micro_batch_size, args.global_batch) == (15, 5, 4096, 2, 8)
    assert args.out.endswith("benchmarks/results/train_throughput.json")
    assert T.main(["--list"]) == 0
    assert T.main(["--cases", "nope-bf16-ours"]) == 2


# ---- FLOPs / MFU math and results -------------------------------------------------------------------


def test_a_cases_memory_peak_leaves_out_what_earlier_cases_left_allocated():
    gib = 2**30
    row = C.memory_row(max_allocated=50 * gib, max_reserved=52 * gib, resident=11 * gib)
    assert row == {"max_allocated_gib": 50.0, "max_reserved_gib": 52.0, "resident_at_start_gib": 11.0,
                   "case_peak_gib": 39.0}


def test_rates_against_the_h100_peak_and_a_measured_gemm():
    r = C.rates(tokens=1000, seconds=2.0, flops_per_token=1e12, device_name="NVIDIA H100 80GB HBM3",
                gemm_tflops=800.0)
    assert r["tokens_per_s"] == 500 and r["tflops_per_gpu"] == pytest.approx(500.0)
    assert r["peak_bf16_tflops"] == 989.0 and r["mfu"] == pytest.approx(500 / 989)
    assert r["ratio_to_measured_gemm"] == pytest.approx(500 / 800)
    unknown = C.rates(10, 1.0, 1e9, "Some GPU")
    assert unknown["mfu"] is None and unknown["ratio_to_measured_gemm"] is None
    with pytest.raises(ValueError):
        C.rates(10, 0.0, 1e9, "H100")


def _row(model, precision, path, tps, seq=4096):
    return {"name": f"{model}-{precision}-{path}", "model": model, "precision": precision, "path": path,
            "seq_len": seq, "tokens_per_s": tps}


def test_ratios_pair_ours_with_stock_fp8_with_bf16_and_hybrid_with_attention():
    rows = [_row("hybrid1b", "bf16", "ours", 98.0), _row("hybrid1b", "bf16", "stock", 100.0),
            _row("hybrid1b", "fp8", "ours", 120.0), _row("attn1b", "bf16", "ours", 50.0),
            {**_row("attn1b", "fp8", "ours", 1.0), "error": "boom"}]
    got = {(w, a, b): v for w, a, b, v in C.ratios(rows)}
    assert got[("ours / stock", "hybrid1b-bf16-ours", "hybrid1b-bf16-stock")] == pytest.approx(0.98)
    assert got[("fp8 / bf16", "hybrid1b-fp8-ours", "hybrid1b-bf16-ours")] == pytest.approx(120 / 98)
    assert got[("hybrid / attention", "hybrid1b-bf16-ours", "attn1b-bf16-ours")] == pytest.approx(98 / 50)
    assert len(got) == 3  # failed rows and unpaired cases give no ratio


def test_result_file_is_valid_json_after_every_row(tmp_path):
    path = tmp_path / "r" / "out.json"
    result = C.ResultFile(path, C.header("train_throughput", ["benchmarks/train_throughput.py"], {"steps": 2}))
    assert json.loads(path.read_text())["cases"] == []
    result.add({"name": "a", "tokens_per_s": 1.0})
    result.update(device="NVIDIA H100", versions=versions())
    data = json.loads(path.read_text())
    assert data["cases"] == [{"name": "a", "tokens_per_s": 1.0}] and data["device"] == "NVIDIA H100"
    assert "synthetic" in data["data"] and data["settings"] == {"steps": 2} and "torch" in data["versions"]
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_kernel_categories_and_summary():
    assert C.kernel_category("_chunk_scan_fwd_kernel") == "mamba_ssd"
    assert C.kernel_category("causal_conv1d_fwd_kernel<128>") == "conv1d"
    assert C.kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert C.kernel_category("flash_fwd_kernel") == "attention"
    assert C.kernel_category("mystery") == "other"
    # PyTorch's own kernels carry "cast" in their template names: they are no FP8 casts
    torch_copy = ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<"
                  "at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)")
    assert C.kernel_category(torch_copy) == "copy"
    assert C.kernel_category("void at::native::unrolled_elementwise_kernel<at::native::CUDAFunctor_add<float>, "
                             "std::array<char*, 3ul>, 4, TrivialOffsetCalculator<2, unsigned int>, "
                             "memory::LoadWithCast<2>, memory::StoreWithCast<1> >") == "elementwise"
    assert C.kernel_category("void transformer_engine::detail::cast_transpose_general_kernel<...>") == "fp8_cast"
    assert C.kernel_category("void transformer_engine::(anonymous namespace)::quantize_kernel<...>") == "fp8_cast"
    s = C.summarize_kernels([("nvjet_gemm", 6.0, 10), ("_chunk_scan_fwd_kernel", 3.0, 4), ("mystery", 1.0, 1)], top=2)
    assert s["kernel_ms_total"] == 10.0 and s["by_category_share"]["gemm"] == pytest.approx(0.6)
    assert [k["name"] for k in s["top_kernels"]] == ["nvjet_gemm", "_chunk_scan_fwd_kernel"]


def test_repeats_are_summarized_by_the_median_run():
    def row(name, rate, **kw):
        return {"name": name, "model": "hybrid1b", "precision": "bf16", "path": name, "seq_len": 4096,
                "tokens_per_s": rate, **kw}

    rows = [row("ours", 90.0, repeat=0), row("stock", 100.0), row("ours", 110.0, repeat=1), row("stock", 101.0),
            row("ours", 100.0, repeat=2), {"name": "stock", "error": "timed out"}]
    summary = {r["name"]: r for r in C.combine_repeats(rows)}
    assert summary["ours"]["tokens_per_s"] == 100.0 and summary["ours"]["repeat"] == 2
    assert summary["ours"]["tokens_per_s_all"] == [90.0, 110.0, 100.0]
    assert summary["ours"]["tokens_per_s_spread"] == pytest.approx(0.2)
    assert summary["stock"]["tokens_per_s"] == 100.0 and summary["stock"]["failed_repeats"] == 1  # median_low
    assert [r[3] for r in C.ratios(list(summary.values()))] == [pytest.approx(1.0)]
    alone = C.combine_repeats([row("x", 5.0)])[0]
    assert alone["tokens_per_s_spread"] is None and alone["repeats"] == 1
    assert C.combine_repeats([{"name": "y", "error": "boom"}]) == [{"name": "y", "error": "boom"}]


def test_profile_counts_gpu_events_only():
    """A CPU op that reports its launched kernels' time (TE's autograd functions do) is not counted again."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def ev(key, us, device):
        return SimpleNamespace(key=key, self_device_time_total=us, count=2, device_type=device)

    events = [ev("_LayerNormLinearBackward", 900.0, DeviceType.CPU), ev("nvjet_sm90_gemm", 600.0, DeviceType.CUDA),
              ev("rmsnorm_bwd_tuned_kernel", 300.0, DeviceType.CUDA), ev("aten::copy_", 0.0, DeviceType.CPU)]
    kernels = C.device_kernel_times(events)
    assert kernels == [("nvjet_sm90_gemm", 0.6, 2), ("rmsnorm_bwd_tuned_kernel", 0.3, 2)]
    assert C.summarize_kernels(kernels)["kernel_ms_total"] == pytest.approx(0.9)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run real benchmark cases")
def test_driver_records_a_failed_worker_and_keeps_going(tmp_path):
    """Without a GPU every worker fails; the JSON still holds one row per case, with the reason."""
    out = tmp_path / "bench.json"
    code = T.main(["--cases", "hybrid1b-bf16-ours,attn1b-bf16-stock", "--steps", "1", "--warmup", "0",
                   "--out", str(out), "--case-timeout-s", "120", "--repeats", "2"])
    data = json.loads(out.read_text())
    assert code == 1 and [(r["name"], r["repeat"]) for r in data["cases"]] == [
        ("hybrid1b-bf16-ours", 0), ("attn1b-bf16-stock", 0), ("hybrid1b-bf16-ours", 1), ("attn1b-bf16-stock", 1)]
    assert [r["name"] for r in data["summary"]] == ["hybrid1b-bf16-ours", "attn1b-bf16-stock"]
    assert all("CUDA GPU" in r["error"] for r in data["cases"])


# ---- conversion fixtures ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FS.FIXTURES))
def test_fixture_configs_are_valid_and_small(name, tmp_path):
    from hybrid_megatron.model.build import padded_vocab_size
    from hybrid_megatron.model.flops import num_parameters

    cfg = FS.load_config(name, tmp_path, 60)
    m = cfg.model
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    assert (tp, pp) == (FS.FIXTURES[name]["tp"], FS.FIXTURES[name]["pp"]) and FS.nproc(name) == tp * pp
    assert cfg.precision.dtype == "fp32" and cfg.train.train_steps == 60 and cfg.logging.run_dir == str(tmp_path)
    counts = pat.count_layers(m.hybrid_layer_pattern)
    if name in FS.MODEL_CHANGES:  # MoE layers in place of most MLPs
        assert counts["moe"] >= 2 and counts["mamba"] == 3 and counts["attention"] == 1
        assert name in FS.TE_REFERENCE
    else:
        assert set(counts.items()) >= {("mamba", 3), ("attention", 1), ("mlp", 3)}
    assert FS.SEQ > m.mamba_chunk_size * 2 and FS.SEQ % m.mamba_chunk_size
    padded = padded_vocab_size(m.vocab_size, m, tp)
    assert (m.vocab_size, padded) == (257, 264)
    # fp32 weights + reference logits stay inside the per-fixture budget (the six fixtures together under 10 MB)
    estimate = 4 * num_parameters(m, padded) + 4 * FS.BATCH * FS.SEQ * padded
    assert estimate < 0.8 * FS.MAX_FIXTURE_BYTES and len(FS.FIXTURES) * FS.MAX_FIXTURE_BYTES < 10_000_000
    if pp == 2:
        stages = pat.split_stages(m.hybrid_layer_pattern, 2)
        assert len(stages[0].chunks[0]) != len(stages[1].chunks[0])  # an uneven split
    overrides = FS.overrides(name, tmp_path, 60)
    assert "data.reset_at_document_boundaries=false" in overrides


def test_windows_from_tokens():
    import numpy as np

    ids = FS.windows_from_tokens(np.arange(2000), batch=2, seq=150, stride=997)
    assert ids.dtype == torch.long and ids.shape == (2, 150)
    assert ids[0, 0] == 0 and ids[1, 0] == 997 and ids[1, -1] == 997 + 149
    with pytest.raises(ValueError, match="need"):
        FS.windows_from_tokens(np.arange(100))


def _fake_reference(prompt_len=FS.PROMPT_LEN, padded=264):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 257, (FS.BATCH, FS.SEQ), generator=g)
    greedy = torch.cat([ids[:, :prompt_len], torch.randint(0, 257, (FS.BATCH, FS.NEW_TOKENS), generator=g)], 1)
    return ids, torch.randn(FS.BATCH, FS.SEQ, padded, generator=g), greedy


def test_reference_round_trip_meets_the_parity_contract(tmp_path):
    ids, logits, greedy = _fake_reference()
    FS.write_reference(tmp_path / "reference.pt", ids, logits.double(), greedy, FS.PROMPT_LEN)
    ref = torch.load(tmp_path / "reference.pt", weights_only=True)  # as tests/test_convert_parity.py loads it
    assert set(ref) == {"input_ids", "logits", "greedy_ids", "prompt_len"}
    assert ref["logits"].dtype == torch.float32 and ref["prompt_len"] == FS.PROMPT_LEN
    FS.check_reference(ref, 257, 264, 64)


@pytest.mark.parametrize("breakage, match", [
    (lambda r: r.pop("greedy_ids"), "lacks"),
    (lambda r: r.update(logits=r["logits"][..., :257]), "logits must be"),
    (lambda r: r.update(input_ids=r["input_ids"][:, :128], logits=r["logits"][:, :128]), "multiple"),
    (lambda r: r.update(greedy_ids=r["greedy_ids"][:, 1:]), "greedy_ids must be"),
    (lambda r: r["greedy_ids"].__setitem__((0, 0), (r["greedy_ids"][0, 0] + 1) % 257), "prompt"),
])
def test_reference_contract_violations_are_named(breakage, match):
    ids, logits, greedy = _fake_reference()
    ref = {"input_ids": ids, "logits": logits, "greedy_ids": greedy, "prompt_len": FS.PROMPT_LEN}
    breakage(ref)
    with pytest.raises(ValueError, match=match):
        FS.check_reference(ref, 257, 264, 64)


def _write_fake_fixture(root: Path) -> None:
    """A model-only torch_dist checkpoint (one tiny tensor, CPU save) + a reference file."""
    from hybrid_megatron.config import ModelConfig
    from hybrid_megatron.config_io import build
    from hybrid_megatron.checkpoint import offline
    from hybrid_megatron.convert import mapping

    save_dir = root / "ckpt"
    save_dir.mkdir(parents=True)
    dims = mapping.Dims.of(build(ModelConfig, dict(FS.MODEL), "model"))
    offline.save_model_only(save_dir, offline.sharded_model_state({FS.EMBEDDING_KEY: torch.zeros(264, 64)}, dims),
                            dict(FS.MODEL))
    FS.write_reference(root / "reference.pt", *_fake_reference(), FS.PROMPT_LEN)


@pytest.mark.slow
def test_check_fixture_reads_a_model_only_save_dir(tmp_path):
    _write_fake_fixture(tmp_path / "tp1")
    sizes = FS.check_fixture(tmp_path / "tp1")
    assert 0 < sizes["ckpt_bytes"] < sizes["bytes"] < FS.MAX_FIXTURE_BYTES
    with pytest.raises(ValueError, match="budget"):
        FS.check_fixture(tmp_path / "tp1", max_bytes=1000)
    (tmp_path / "tp1" / "ckpt" / "step-000010").mkdir()
    with pytest.raises(ValueError, match="exactly one step dir"):
        FS.check_fixture(tmp_path / "tp1")


def test_fixture_driver_skips_what_the_gpus_cannot_run(tmp_path, capsys):
    summary = tmp_path / "summary.json"
    code = F.main(["--gpus", "0", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "fx"),
                   "--summary", str(summary), "--fixtures", "tp1,pp2"])
    data = json.loads(summary.read_text())
    assert code == 0 and [r["status"] for r in data["fixtures"]] == ["skipped", "skipped"]
    assert "needs 2 GPUs" in data["fixtures"][1]["error"] and "fixture" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        F.parse_args(["--fixtures", "tp4"])


def test_fixture_worker_command_lines():
    argv = F.worker_argv("record", "pp2", Path("/tmp/run"), 60, FS.FIXTURES["pp2"], Path("/tmp/out"),
                          Path("/tmp/info.json"), Path("/tmp/src"))
    args = F.parse_args(argv[1:])
    assert (args.worker, args.fixture, args.steps, args.source) == ("record", "pp2", 60, "/tmp/src")
    assert json.loads(args.layout) == {"tp": 1, "pp": 2}


def test_gpu_check_script_is_clean_shell():
    script = ROOT / "tools" / "run_gpu_checks.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    shellcheck = Path(sys.executable).parent / "shellcheck"
    if shellcheck.exists():
        result = subprocess.run([str(shellcheck), str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
    bad = subprocess.run(["bash", str(script), "bogus"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown stage" in bad.stderr


def test_strict_fp32_env_compiles_triton_dots_in_ieee_into_an_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_F32_DEFAULT", "tf32")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere")
    cache = tmp_path / "cache"
    (cache / "stale").mkdir(parents=True)  # a kernel compiled with TF32 dots must not be reused
    W.strict_fp32_env(cache)
    import os

    assert os.environ["TRITON_F32_DEFAULT"] == "ieee" and os.environ["TRITON_CACHE_DIR"] == str(cache)
    assert cache.is_dir() and not any(cache.iterdir())
    argv = F.worker_argv("record", "tp1", Path("/tmp/run"), 200, FS.FIXTURES["tp1"], Path("/o"), Path("/i"), Path("/s"))
    assert argv[argv.index("--reference") + 1] == "fp32" and F.parse_args(["--fixtures", "tp1"]).steps == 400
