"""`hybrid-megatron inspect` on real checkpoints (the conversion fixtures, trained by pretrain on a GPU) and on
checkpoints written here through megatron's own CPU save: per-layer statistics, SSM timescales, the change
against another checkpoint, and one-line errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml

from hybrid_megatron.checkpoint import offline
from hybrid_megatron.cli import main
from hybrid_megatron.config import load_run_config
from hybrid_megatron.config_io import to_dict
from hybrid_megatron.convert.mapping import Dims, layer_groups
from hybrid_megatron.devtools import REPO_ROOT
from hybrid_megatron.eval import weights, weights_report
from hybrid_megatron.model import geometry as geo

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "convert"
TP1 = FIXTURES / "tp1" / "ckpt"


def _model_tensors(step_dir) -> dict[str, torch.Tensor]:
    reader = offline.CheckpointReader(step_dir)
    keys = sorted(k for k in reader.tensors if k.startswith(("embedding.", "decoder.", "output_layer.")))
    return dict(zip(keys, reader.read(keys)))


def test_timescales_are_the_decay_horizon_at_the_bias_step():
    a_log = torch.tensor([-3.0, 0.0, 1.5, 2.7, 0.3], dtype=torch.float64)
    dt_bias = torch.tensor([-40.0, -4.6, 0.0, 3.0, 60.0], dtype=torch.float64)  # softplus's tails included
    expected = 1.0 / (a_log.exp() * torch.nn.functional.softplus(dt_bias))
    got = weights.timescales(a_log.tolist(), dt_bias.tolist())
    assert got == pytest.approx(expected.tolist(), rel=1e-12)
    # one token at the bias step multiplies the state by exp(-1 / tau): tau tokens take it to 1/e
    for tau, a, b in list(zip(got, a_log, dt_bias))[1:]:  # (the first decays by 1 - 1e-18 a token: 1.0 in floats)
        step = math.exp(-math.exp(a) * float(torch.nn.functional.softplus(b)))
        assert step ** tau == pytest.approx(math.exp(-1), rel=1e-9)


def test_a_trained_hybrid_by_layer():
    result = weights.inspect(TP1, context=1024)
    cfg = offline.load_model_config(TP1 / "step-000000")
    assert [layer["symbol"] for layer in result["layers"]] == list(cfg.hybrid_layer_pattern.replace("|", ""))
    tensors = _model_tensors(TP1 / "step-000000")
    for layer in result["layers"]:
        mine = {k: t for k, t in tensors.items() if k.startswith(f"decoder.layers.{layer['index']}.")}
        matrices = [t.double() for t in mine.values() if t.dim() >= 2]
        rms = math.sqrt(sum(float((t * t).sum()) for t in matrices) / sum(t.numel() for t in matrices))
        assert layer["rms"] == pytest.approx(rms, rel=1e-12)
        assert set(layer["tensors"]) == {k.split(".", 3)[3] for k in mine}
        if layer["symbol"] == "M":
            i = layer["index"]
            taus = weights.timescales(tensors[f"decoder.layers.{i}.mixer.A_log"].tolist(),
                                      tensors[f"decoder.layers.{i}.mixer.dt_bias"].tolist())
            ssm = layer["ssm"]
            assert ssm["timescales"] == taus and ssm["heads"] == cfg.num_mamba_heads
            assert ssm["short_heads"] == sum(t < weights.SHORT_TOKENS for t in taus)
            assert ssm["context_heads"] == sum(t >= 1024 for t in taus)
            assert ssm["D"] == tensors[f"decoder.layers.{i}.mixer.D"].tolist()
        else:
            assert "ssm" not in layer
    assert set(result["ends"]) == {"embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_norm.weight"}
    # docs/evaluation.md's figures for this fixture
    ssm = [layer["ssm"] for layer in result["layers"] if "ssm" in layer]
    assert [round(s["median"]) for s in ssm] == [29, 11, 27] and sum(s["short_heads"] for s in ssm) == 7
    assert round(min(s["min"] for s in ssm), 2) == 0.96 and round(max(s["max"] for s in ssm)) == 296
    assert sum(s["context_heads"] for s in ssm) == 0


def test_the_change_against_another_checkpoint_is_where_the_weights_moved(tmp_path):
    """A copy with the attention layer's QKV scaled by 1.1, saved through megatron's CPU save: that layer moved by
    0.1 of its QKV's share of the layer, every other layer by nothing."""
    cfg = offline.load_model_config(TP1 / "step-000000")
    tensors = _model_tensors(TP1 / "step-000000")
    qkv = "decoder.layers.2.self_attention.linear_qkv.weight"
    a_log = "decoder.layers.0.mixer.A_log"
    moved = {**tensors, qkv: tensors[qkv] * 1.1, a_log: tensors[a_log] + math.log(2.0)}  # layer 0 forgets 2x faster
    copy = offline.save_model_only(tmp_path / "ckpt", offline.sharded_model_state(moved, Dims.of(cfg)), to_dict(cfg))
    result = weights.inspect(copy, against=TP1)
    layer2 = {k: t.double() for k, t in tensors.items() if k.startswith("decoder.layers.2.")}
    expected = 0.1 * tensors[qkv].double().norm() / math.sqrt(sum(float((t * t).sum()) for t in layer2.values()))
    for layer in result["layers"]:
        if layer["index"] != 0:
            assert layer["relative_change"] == pytest.approx(float(expected) if layer["index"] == 2 else 0.0, abs=1e-6)
    assert result["layers"][2]["tensors"]["self_attention.linear_qkv.weight"]["relative_change"] == pytest.approx(0.1)
    ssm = result["layers"][0]["ssm"]  # A doubled: every horizon halved against the fixture's
    assert ssm["timescales"] == pytest.approx([t / 2 for t in ssm["timescales_before"]], rel=1e-6)
    assert ssm["timescales_before"] == pytest.approx(
        weights.timescales(tensors[a_log].tolist(), tensors["decoder.layers.0.mixer.dt_bias"].tolist()))
    other = result["layers"][3]["ssm"]
    assert other["timescales_before"] == other["timescales"] and other["median_before"] == other["median"]
    assert "median tau before" in weights_report.markdown(result)
    assert all(stats["relative_change"] == 0.0 for stats in result["ends"].values())


def _random_checkpoint(root, overrides):
    """A weights-only checkpoint of the tiny recipe with ``overrides``, every tensor the geometry names (split
    keys where megatron stores them split) random, through megatron's CPU save."""
    cfg = load_run_config(REPO_ROOT / "configs" / "tiny.yaml", ["model.vocab_size=257", *overrides]).model
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i, layer in enumerate(geo.layers(cfg)):
        for p in layer.params:
            parts = p.parts or (("", p.shape[0]),)
            for suffix, rows in parts:
                key = geo.layer_key(i, p.name) + (f".{suffix}" if suffix else "")
                tensors[key] = torch.randn((rows, *p.shape[1:]), generator=gen) * 0.02
    from megatron.core.dist_checkpointing import ShardedTensor

    state = {k: ShardedTensor.from_rank_offsets(k, t, replica_id=0) for k, t in tensors.items()}
    return cfg, tensors, offline.save_model_only(root, state, to_dict(cfg))


def test_gated_deltanet_heads_have_timescales_too(tmp_path):
    cfg, tensors, step_dir = _random_checkpoint(tmp_path / "ckpt", ["model.hybrid_layer_pattern=G-G*-",
                                                                     "model.gdn_key_head_dim=32",
                                                                     "model.gdn_value_head_dim=32"])
    result = weights.inspect(step_dir, context=512)
    for layer in result["layers"]:
        if layer["symbol"] == "G":
            i = layer["index"]
            expected = weights.timescales(tensors[f"decoder.layers.{i}.self_attention.A_log"].tolist(),
                                          tensors[f"decoder.layers.{i}.self_attention.dt_bias"].tolist())
            assert layer["ssm"]["timescales"] == expected and layer["ssm"]["heads"] == cfg.num_gdn_value_heads
            assert "D" not in layer["ssm"]  # the delta rule has no skip parameter
        else:
            assert "ssm" not in layer


def test_the_command_writes_its_report_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    out = tmp_path / "inspect"
    assert main(["inspect", str(TP1), "--out", str(out), "--context", "1024"]) == 0
    written = json.loads((out / "inspect.json").read_text())
    assert written["plots"] == {"layers": "layers.png", "timescales": "timescales.png"}
    for png in written["plots"].values():
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| 0 | mamba | " in report and "heads >= 1024 (training length)" in report
    assert "layer 2 attention: weight RMS" in capsys.readouterr().out
    moe = FIXTURES / "moe" / "ckpt"
    for args, code, message in (
            ([str(TP1), "--against", str(moe)], 2, f"--against {moe}/step-000000: another architecture"),
            ([str(TP1), "--against", str(tmp_path / "none")], 2, f"--against {tmp_path / 'none'}: no such checkpoint"),
            ([str(TP1), "--context", "0"], 2, "--context 0: must be >= 1"),
            ([str(TP1)], 2, "is not inside a run directory written by pretrain: pass --out DIR"),
            ([str(tmp_path)], 2, "no checkpoint there")):
        assert main(["inspect", *args, *(["--out", str(out)] if "--out DIR" not in message else [])]) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_an_moe_hybrid_by_expert_and_an_expert_that_did_not_train(tmp_path):
    """A copy of the MoE fixture in which every routed expert of layer 1 but expert 2 moved by 10%: against the
    fixture, expert 2 is named as one that barely trained; the router rows and routing biases are the stored ones."""
    moe_dir = FIXTURES / "moe" / "ckpt" / "step-000000"
    cfg = offline.load_model_config(moe_dir)
    tensors = _model_tensors(moe_dir)
    moved = dict(tensors)
    for name in ("linear_fc1", "linear_fc2"):
        key = f"decoder.layers.1.mlp.experts.experts.{name}.weight"
        scale = torch.full((tensors[key].shape[0], 1, 1), 1.1)
        scale[2] = 1.0
        moved[key] = tensors[key] * scale
    copy = offline.save_model_only(tmp_path / "ckpt", offline.sharded_model_state(moved, Dims.of(cfg)), to_dict(cfg))
    result = weights.inspect(copy, against=moe_dir)
    experts = result["layers"][1]["experts"]
    assert experts["count"] == cfg.moe_num_experts
    assert experts["relative_change"] == pytest.approx([0.1, 0.1, 0.0, 0.1]) and experts["still"] == [2]
    router = tensors["decoder.layers.1.mlp.router.weight"].double()
    assert experts["router_norm"] == pytest.approx(router.norm(dim=1).tolist())
    assert experts["expert_bias"] == pytest.approx(tensors["decoder.layers.1.mlp.router.expert_bias"].tolist())
    other = next(layer for layer in result["layers"] if layer["type"] == "moe" and layer["index"] != 1)
    assert other["experts"]["still"] == [] and set(other["experts"]["relative_change"]) == {0.0}
    report = weights_report.markdown(result)
    assert "Layer 1 (MoE), its 4 routed experts:" in report and "Experts 2 moved less than 0.1" in report


def test_sums_over_slices_equal_sums_over_whole_tensors(monkeypatch):
    """Large tensors are summed a slice at a time (a 7B embedding in float64 whole would not fit beside it)."""
    whole = weights.inspect(TP1, against=TP1)
    monkeypatch.setattr(weights, "SLICE_ELEMENTS", 1000)  # the fixture's matrices span several slices
    sliced = weights.inspect(TP1, against=TP1)
    for a, b in zip(whole["layers"], sliced["layers"]):
        assert b["rms"] == pytest.approx(a["rms"], rel=1e-12)
        for name, stats in a["tensors"].items():
            assert b["tensors"][name]["max_abs"] == stats["max_abs"]
            assert b["tensors"][name]["rms"] == pytest.approx(stats["rms"], rel=1e-12)
    assert whole["ends"]["embedding.word_embeddings.weight"]["numel"] > 10 * 1000


def test_a_run_checkpoint_reports_into_its_run_and_counts_against_its_training_length(tmp_path, capsys):
    """A checkpoint inside a run directory (as pretrain leaves it, its run config with the data section): the
    report goes to <run dir>/inspect/<step dir>, and the heads are counted against the curriculum's longest
    sequence without --context."""
    run = tmp_path / "run"
    shutil.copytree(TP1, run / "checkpoints")
    (run / "config.yaml").write_text("{}\n")
    step = run / "checkpoints" / "step-000000"
    saved = yaml.safe_load((step / "run_config.yaml").read_text())
    saved["data"] = yaml.safe_load((REPO_ROOT / "configs" / "data" / "sample.yaml").read_text())
    (step / "run_config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["inspect", str(run / "checkpoints")]) == 0
    written = json.loads((run / "inspect" / "step-000000" / "inspect.json").read_text())
    assert written["context"] == saved["data"]["curriculum"]["max_seq_len"] == 1024
    assert "heads >= 1024 (training length)" in (run / "inspect" / "step-000000" / "report.md").read_text()


def test_attention_heads_by_their_query_rows_and_output_columns(tmp_path):
    """The query rows of each head, located in megatron's fused QKV, agree with the converter's split into Hugging
    Face's q_proj (checked against transformers by the parity fixtures); a head whose output columns are scaled to
    1% is named as quiet, and its movement against the fixture shows."""
    cfg = offline.load_model_config(TP1 / "step-000000")
    tensors = _model_tensors(TP1 / "step-000000")
    qkv, proj = "decoder.layers.2.self_attention.linear_qkv.weight", "decoder.layers.2.self_attention.linear_proj.weight"
    group = next(g for g in layer_groups(2, "*", Dims.of(cfg), cfg) if qkv in g.meg_keys)
    q_proj = group.to_hf([tensors[qkv]])[0]
    hd = cfg.head_dim
    heads = weights.inspect(TP1)["layers"][2]["heads"]
    assert heads["count"] == cfg.num_attention_heads and heads["quiet"] == []
    assert heads["query_norm"] == pytest.approx([float(q_proj[h * hd:(h + 1) * hd].double().norm())
                                                 for h in range(heads["count"])], rel=1e-12)
    quiet = tensors[proj].clone()
    quiet[:, 3 * hd:4 * hd] *= 0.01
    copy = offline.save_model_only(tmp_path / "ckpt", offline.sharded_model_state({**tensors, proj: quiet}, Dims.of(cfg)),
                                   to_dict(cfg))
    result = weights.inspect(copy, against=TP1)
    heads = result["layers"][2]["heads"]
    assert heads["quiet"] == [3] and heads["relative_change"][:3] == [0.0, 0.0, 0.0] and heads["relative_change"][3] > 0
    assert "Heads 3 write back less than 0.1" in weights_report.markdown(result)
