"""Context parallelism as the dry run plans it: megatron's caps as one line each (Mamba heads per TP rank for its
all-to-all, groups, Gated DeltaNet heads, 2 x CP chunks per sequence and per packed document), the layout and the
memory per GPU; training with CP > 1 is refused before any GPU work until its step has run on several GPUs. The
step's pieces that exist are checked here: each CP rank's share of a micro-batch, and the state-passing choice."""

from __future__ import annotations

import pytest

from data_pipeline.errors import ConfigError
from gloo_world import run_ranks
from hybrid_megatron.cli import main
from hybrid_megatron.config import load_run_config
from hybrid_megatron.model import memory

ONE_B = "configs/1b.yaml"  # 64 Mamba heads, 8 groups, seq 4096
UNPACKED = ["data.reset_at_document_boundaries=false"]


def _cfg(*overrides):
    return load_run_config(ONE_B, [*UNPACKED, *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["parallel.context_parallel_size=3"], "CP must divide 64: at most 64"),
    (["parallel.tensor_model_parallel_size=8", "parallel.sequence_parallel=true", "parallel.context_parallel_size=16"],
     "whole heads of the 8 per TP rank (model.mamba_num_heads 64 / TP 8), so CP must divide 8: at most 8"),
    (["parallel.context_parallel_size=4", "model.mamba_num_groups=6", "model.mamba_num_heads=48"],
     "the 6 Mamba groups per TP rank must divide CP or be divided by it"),
    (["parallel.context_parallel_size=16", "data.seq_len=4104"], "data.seq_len=4104: context parallelism splits"),
])
def test_megatron_caps_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _cfg(*overrides)


def test_state_passing_lifts_the_mamba_head_cap_down_to_the_conv_halo():
    from hybrid_megatron.model.specs import stack_spec

    sp = ["parallel.mamba_context_parallel=state_passing", "model.layer_spec=local"]
    cfg = _cfg("parallel.context_parallel_size=128", *sp)  # 64 heads: twice megatron's all-to-all cap
    assert stack_spec(cfg).submodules.mamba_layer.submodules.mixer.module.__name__ == "StatePassingMambaMixer"
    assert stack_spec(_cfg("parallel.context_parallel_size=2", "model.layer_spec=local")
                      ).submodules.mamba_layer.submodules.mixer.module.__name__ == "MambaMixer"
    with pytest.raises(ConfigError, match="chunks of 2 tokens .* shorter than the Mamba conv's halo of 3 tokens"):
        _cfg("parallel.context_parallel_size=1024", *sp)
    with pytest.raises(ConfigError, match="parallel.mamba_context_parallel='ring': must be one of"):
        _cfg("parallel.mamba_context_parallel=ring")


def test_packed_documents_need_padding_to_2cp_and_the_conv_halo_with_state_passing():
    with pytest.raises(ConfigError, match=r"splits each document into 2 x CP = 4 chunks: set data.document_multiple "
                                          r"to a multiple of 4 \(it is 1\)"):
        load_run_config(ONE_B, ["parallel.context_parallel_size=2"])
    with pytest.raises(ConfigError, match="to a multiple of 8 \\(it is 4\\)"):
        load_run_config(ONE_B, ["parallel.context_parallel_size=4", "data.document_multiple=4"])
    cfg = load_run_config(ONE_B, ["parallel.context_parallel_size=4", "data.document_multiple=16"])
    assert cfg.data.reset_at_document_boundaries and cfg.data.document_multiple == 16
    sp = ["parallel.mamba_context_parallel=state_passing"]
    with pytest.raises(ConfigError, match=r"state-passing Mamba CP splits each packed document into 2 x CP = 4 chunks "
                                          r"of at least the conv's halo \(3 tokens\): set data.document_multiple to a "
                                          r"multiple of 4 of at least 12 \(it is 4\)"):
        load_run_config(ONE_B, ["parallel.context_parallel_size=2", "data.document_multiple=4", *sp])
    with pytest.raises(ConfigError, match=r"a multiple of 8 of at least 24 \(it is 16\)"):
        load_run_config(ONE_B, ["parallel.context_parallel_size=4", "data.document_multiple=16", *sp])
    assert load_run_config(ONE_B, ["parallel.context_parallel_size=2", "data.document_multiple=16", *sp])


def test_sliding_windows_under_cp_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="with sliding-window attention \\(model.attention_window=1024\\): Transformer "
                                          "Engine takes windows under context parallelism only with its a2a or all_gather"):
        _cfg("parallel.context_parallel_size=2", "model.attention_window=1024", "model.global_attention_layers=[0]")


def test_gdn_heads_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"TP 1 x CP 16 must divide the Gated DeltaNet key heads \(8\)"):
        load_run_config("configs/tiny.yaml", [*UNPACKED, "model.hybrid_layer_pattern=G-G*-", "model.gdn_key_head_dim=64",
                                              "model.gdn_value_head_dim=64", "parallel.context_parallel_size=16"])


def test_cp_divides_each_gpus_tokens_and_comes_out_of_data_parallelism():
    one, two = _cfg(), _cfg("parallel.context_parallel_size=2")
    assert memory.data_parallel_size(one, 8) == 8 and memory.data_parallel_size(two, 8) == 4
    a, b = memory.estimate(one, 32000, 4096, world_size=8)[0], memory.estimate(two, 32000, 4096, world_size=8)[0]
    assert 0.45 * a.activations < b.activations < 0.6 * a.activations  # half the tokens (+ the K/V ring)
    assert b.weights == a.weights and b.optimizer == a.optimizer  # sharded over DP 4 x CP 2 = 8 ranks, as before
    with pytest.raises(ConfigError, match="must be a positive multiple of TP 1 x PP 1 x CP 2 = 2"):
        memory.data_parallel_size(two, 7)


def test_state_passing_counts_its_unfused_activations_in_every_mamba_layer():
    """Same weights and optimizer; more activations, and the extra grows with the Mamba layers (the numbers per
    layer are checked against the tensors autograd keeps in tests/test_gpu_ssm_state_passing.py)."""
    def extra(pattern: str) -> float:
        a2a, sp = (memory.estimate(_cfg("parallel.context_parallel_size=2", f"model.hybrid_layer_pattern={pattern}",
                                        f"parallel.mamba_context_parallel={mode}"), 32000, 4096, world_size=2)[0]
                   for mode in ("all_to_all", "state_passing"))
        assert (sp.weights, sp.grads, sp.optimizer) == (a2a.weights, a2a.grads, a2a.optimizer)
        return sp.activations - a2a.activations

    assert extra("M-*-") > 0
    assert extra("M-M-M-*-") == pytest.approx(3 * extra("M-*-"))
    assert extra("*-*-") == 0


def test_the_dry_run_plans_cp_and_pretrain_refuses_it(capsys):
    argv = ["pretrain", ONE_B, *UNPACKED, "parallel.context_parallel_size=4"]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 GPUs = TP 1 x PP 1 x CP 4 x DP 2" in out and "distributed optimizer (sharded over DP 2 x CP 4)" in out
    assert main([*argv, "parallel.mamba_context_parallel=state_passing", "--dry-run"]) == 0
    assert "Mamba CP by state passing (unfused conv and scan: more activations" in capsys.readouterr().out
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "its training step (each rank's share of every sequence" in err and "has not run on several GPUs" in err


def _share(rank: int, out) -> None:
    import torch
    from megatron.core import parallel_state as ps

    from hybrid_megatron.training.step import MicroBatch, cp_share

    tokens = torch.arange(2 * 16).reshape(2, 16)
    mb = MicroBatch(input_ids=tokens, labels=tokens + 1, loss_mask=(tokens % 3 > 0).float(), position_ids=tokens % 16,
                    packed_seq_params=None)
    got = cp_share(mb, ps.get_context_parallel_group())
    out[rank] = {k: getattr(got, k).tolist() for k in ("input_ids", "labels", "loss_mask", "position_ids")}


def test_the_training_step_gives_each_cp_rank_its_zigzag_share_of_every_tensor():
    """CP 2: 4 chunks of 4 tokens, rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2, for every per-token tensor."""
    shares = run_ranks(_share, world=2, cp=2)
    cols = {0: [0, 1, 2, 3, 12, 13, 14, 15], 1: [4, 5, 6, 7, 8, 9, 10, 11]}
    for rank, got in shares.items():
        ids = [[16 * row + c for c in cols[rank]] for row in range(2)]
        assert got["input_ids"] == ids and got["labels"] == [[t + 1 for t in r] for r in ids]
        assert got["position_ids"] == [[t % 16 for t in r] for r in ids]
        assert got["loss_mask"] == [[float(t % 3 > 0) for t in r] for r in ids]


def test_the_state_passing_share_docs_cluster_states_is_the_memory_models():
    import re
    from pathlib import Path

    text = " ".join((Path(__file__).resolve().parents[1] / "docs" / "cluster.md").read_text().split())
    found = re.search(r"for the 1B hybrid at 16k tokens per GPU about ([0-9.]+) times the fused path's bytes per "
                      r"Mamba layer at CP 2, and ([0-9.]+) times at CP 64", text)
    m = _cfg().model
    for cp, stated in ((2, found.group(1)), (64, found.group(2))):
        ratio = memory.mamba_mixer_stored(m, 16384, 1, 2 * cp) / memory.mamba_mixer_stored(m, 16384, 1)
        assert f"{ratio:.1f}" == stated, (cp, ratio)
