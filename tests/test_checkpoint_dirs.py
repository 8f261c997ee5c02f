"""The checkpoint directory protocol: tmp dir, rename, `latest` by rename, pruning, refusals."""

from __future__ import annotations

import json

import pytest

from data_pipeline.errors import ConfigError
from hybrid_megatron.checkpoint import architecture
from hybrid_megatron.checkpoint import layout as ckpt


def _tmp_step(save_dir, step):
    tmp = save_dir / f"{ckpt.step_dir_name(step)}.tmp"
    tmp.mkdir(parents=True)
    (tmp / "shard.distcp").write_bytes(b"x" * 10)
    (tmp / ".metadata").write_bytes(b"index")  # torch_dist writes it once every shard is on disk
    return tmp


def _files(step):
    return {"train_state.json": json.dumps({"step": step}), "run_config.yaml": "model: {}\n"}


def test_commit_renames_then_points_latest(tmp_path):
    final = ckpt.commit(tmp_path, _tmp_step(tmp_path, 5), 5, _files(5), keep_last=None)
    assert final.name == "step-000005" and (final / "shard.distcp").is_file()
    assert (tmp_path / "latest").read_text() == "step-000005\n"
    assert ckpt.read_latest(tmp_path) == final
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / ".latest.tmp").exists()


def test_interrupted_save_leaves_latest_on_the_previous_checkpoint(tmp_path):
    ckpt.commit(tmp_path, _tmp_step(tmp_path, 5), 5, _files(5), keep_last=None)
    _tmp_step(tmp_path, 10)  # a save that died before its commit
    assert ckpt.read_latest(tmp_path).name == "step-000005"
    ckpt.clean_stale_tmp(tmp_path)
    assert not (tmp_path / "step-000010.tmp").exists()


def test_keep_last_prunes_old_steps_but_never_latest(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.commit(tmp_path, _tmp_step(tmp_path, step), step, _files(step), keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000003", "step-000004"]


def test_keep_last_spares_the_saved_initial_weights(tmp_path):
    files = {"train_state.json": json.dumps({"step": 0, "weights_only": True}), "run_config.yaml": "model: {}\n"}
    ckpt.commit(tmp_path, _tmp_step(tmp_path, 0), 0, files, keep_last=2)
    for step in (1, 2, 3, 4):
        ckpt.commit(tmp_path, _tmp_step(tmp_path, step), step, _files(step), keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000000", "step-000003", "step-000004"]


def test_latest_naming_an_incomplete_dir_is_refused(tmp_path):
    (tmp_path / "step-000007").mkdir()
    (tmp_path / "latest").write_text("step-000007\n")
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        ckpt.read_latest(tmp_path)


def test_resolve_accepts_a_step_dir_or_a_save_dir(tmp_path):
    final = ckpt.commit(tmp_path, _tmp_step(tmp_path, 3), 3, _files(3), keep_last=None)
    assert ckpt.resolve_step_dir(tmp_path) == final
    assert ckpt.resolve_step_dir(final) == final
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        ckpt.resolve_step_dir(tmp_path / "elsewhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="checkpoint.load=.*empty: no checkpoint there"):
        ckpt.resolve_step_dir(tmp_path / "empty", what="checkpoint.load=")


def test_an_unfinished_save_is_never_a_checkpoint(tmp_path):
    """Training and convert share one rule: a .tmp dir, or a step dir missing either marker, is not read."""
    tmp = _tmp_step(tmp_path, 7)
    (tmp / "train_state.json").write_text("{}")
    with pytest.raises(ConfigError, match="unfinished save"):
        ckpt.resolve_step_dir(tmp)
    (tmp_path / "latest").write_text(tmp.name + "\n")  # a pointer at the tmp dir (a hand edit, an old bug)
    with pytest.raises(ConfigError, match="not a step dir name"):
        ckpt.resolve_step_dir(tmp_path)
    for missing in (".metadata", "train_state.json"):
        step = tmp_path / f"step-00000{len(missing)}"
        step.mkdir()
        (step / ({".metadata", "train_state.json"} - {missing}).pop()).write_text("{}")
        assert not ckpt.is_complete(step)


def test_architecture_change_is_refused_but_cuts_and_spellings_may_differ(tmp_path):
    from hybrid_megatron.config import load_run_config
    from hybrid_megatron.config_io import to_dict

    saved = to_dict(load_run_config("configs/tiny.yaml").model)
    same = {**saved, "hybrid_layer_pattern": "M-M*-M-M*-", "layer_spec": "local", "kv_channels": 64,
            "mamba_num_heads": 16}  # no cut; explicit values equal to the derived ones
    architecture.check_architecture(saved, same, tmp_path)
    with pytest.raises(ConfigError, match="model.hidden_size=512 there, 768 in this config"):
        architecture.check_architecture(saved, {**saved, "hidden_size": 768, "mamba_head_dim": 96}, tmp_path)
    with pytest.raises(ConfigError, match="model.mamba_state_dim=64 there, 128"):
        architecture.check_architecture(saved, {**saved, "mamba_state_dim": 128}, tmp_path)


def test_the_new_families_weight_shapes_are_architecture_but_routing_is_not(tmp_path):
    from hybrid_megatron.config import load_run_config
    from hybrid_megatron.config_io import to_dict

    saved = to_dict(load_run_config("configs/tiny.yaml", [
        "model.hybrid_layer_pattern=GEG*E|GEG*E", "model.gdn_key_head_dim=64", "model.gdn_value_head_dim=64",
        "model.moe_num_experts=8", "model.moe_shared_expert_size=256"]).model)
    architecture.check_architecture(saved, {**saved, "moe_top_k": 4, "moe_capacity_factor": 1.5,
                                            "gdn_num_key_heads": 8, "moe_ffn_hidden_size": 1536}, tmp_path)
    for change, message in (({"gdn_num_value_heads": 8}, "model.gdn_num_value_heads=16 there, 8"),
                            ({"moe_num_experts": 16}, "model.moe_num_experts=8 there, 16"),
                            ({"moe_expert_bias": True}, "model.moe_expert_bias=False there, True"),
                            ({"moe_shared_expert_size": None}, "model.moe_shared_expert_size=256 there, None")):
        with pytest.raises(ConfigError, match=message):
            architecture.check_architecture(saved, {**saved, **change}, tmp_path)


def test_a_latest_pointer_of_binary_garbage_is_one_clear_error(tmp_path):
    (tmp_path / "latest").write_bytes(b"\xff\xfe\x00step")
    with pytest.raises(ConfigError, match="latest: unreadable pointer file"):
        ckpt.read_latest(tmp_path)
