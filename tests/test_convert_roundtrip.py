"""from-hf -> to-hf on a random tiny NemotronH: exact tensors, a loadable HF dir, equal logits, refusals."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from hybrid_megatron.cli import main
from hybrid_megatron.checkpoint import layout, offline
from hybrid_megatron.convert import mapping
from hybrid_megatron.convert.testing import hf_tensors, random_nemotron_h


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The original HF dir, the from-hf save dir (fp32) and the fp32 to-hf export of it."""
    root = tmp_path_factory.mktemp("roundtrip")
    model = random_nemotron_h(seed=0)
    model.save_pretrained(root / "hf")
    assert main(["convert", "from-hf", str(root / "hf"), str(root / "ckpt"), "--dtype", "fp32"]) == 0
    assert main(["convert", "to-hf", str(root / "ckpt"), str(root / "out"), "--dtype", "fp32", "--no-progress"]) == 0
    return {"root": root, "model": model}


def test_round_trip_reproduces_every_tensor_bit_for_bit(converted):
    root = converted["root"]
    original, exported = hf_tensors(root / "hf"), hf_tensors(root / "out")
    assert sorted(original) == sorted(exported)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key


def test_from_hf_writes_the_training_layout(converted):
    save_dir = converted["root"] / "ckpt"
    step_dir = layout.resolve_step_dir(save_dir)
    assert step_dir.name == "step-000000" and (save_dir / "latest").read_text().strip() == "step-000000"
    assert json.loads((step_dir / "train_state.json").read_text()) == {"weights_only": True, "step": 0}
    assert json.loads((step_dir / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    model_section = yaml.safe_load((step_dir / "run_config.yaml").read_text())["model"]
    assert model_section["hybrid_layer_pattern"] == "M*-M-*M-" and model_section["vocab_size"] == 250
    cfg = offline.load_model_config(step_dir)
    reader = offline.CheckpointReader(step_dir)
    stored = {k: v for k, v in reader.tensors.items() if mapping.is_model_key(k)}
    assert {k: s for k, (s, _) in stored.items()} == mapping.expected_megatron_shapes(cfg, padded_vocab=256)
    for key, (_, dtype) in stored.items():
        assert dtype == torch.float32, key  # an fp32 import; SSM params are fp32 in any case
    (emb,) = reader.read(["embedding.word_embeddings.weight"])
    assert torch.count_nonzero(emb[250:]) == 0  # padding rows are zero, as megatron fills missing rows


def test_exported_model_loads_and_matches_logits(converted):
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(converted["root"] / "out", dtype=torch.float32).eval()
    assert type(exported).__name__ == "NemotronHForCausalLM"
    ids = torch.randint(0, 250, (2, 37), generator=torch.Generator().manual_seed(1))  # > 2 chunks of 16
    with torch.no_grad():
        want, got = converted["model"](ids).logits, exported(ids).logits
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_bf16_export_keeps_ssm_params_fp32(converted):
    root = converted["root"]
    assert main(["convert", "to-hf", str(root / "ckpt" / "step-000000"), str(root / "bf16"), "--no-progress"]) == 0
    tensors = hf_tensors(root / "bf16")
    original = hf_tensors(root / "hf")
    for key, tensor in tensors.items():
        fp32 = key.endswith(mapping.SSM_FP32_NAMES)
        assert tensor.dtype == (torch.float32 if fp32 else torch.bfloat16), key
        assert torch.equal(tensor, original[key].to(tensor.dtype)), key
    assert json.loads((root / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_keep_vocab_padding_and_sharded_output(converted):
    root = converted["root"]
    out = root / "padded"
    args = ["convert", "to-hf", str(root / "ckpt"), str(out), "--keep-vocab-padding", "--dtype", "fp32",
            "--max-shard-size-gb", "0.0001", "--no-progress"]
    assert main(args) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    tensors = hf_tensors(out)
    assert tensors["lm_head.weight"].shape[0] == 256
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 256


def test_refuses_non_empty_output_without_overwrite(converted, capsys):
    root = converted["root"]
    assert main(["convert", "to-hf", str(root / "ckpt"), str(root / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {root / 'out'} exists and is not empty: pass --overwrite to replace it (the whole "
                   "directory, once the new output is complete)"]
    assert main(["convert", "from-hf", str(root / "hf"), str(root / "ckpt")]) == 2


def test_export_refusal_comes_before_any_write(tmp_path, capsys):
    step = tmp_path / "step-000001"
    step.mkdir()
    (step / ".metadata").write_bytes(b"")  # never read: the model section is refused first
    (step / "train_state.json").write_text('{"weights_only": true, "step": 1}')
    model = {"hybrid_layer_pattern": "M*-", "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4,
             "mamba_head_dim": 16, "mamba_num_groups": 2, "position_embedding_type": "rope", "vocab_size": 250}
    (step / "run_config.yaml").write_text(yaml.safe_dump({"model": model}))
    assert main(["convert", "to-hf", str(step), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: cannot export to NemotronH: position_embedding_type=rope: NemotronH has no RoPE"]
    assert not (tmp_path / "out").exists()


def test_tokenizer_files_and_ids_are_written(converted, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 200)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(tmp_path / "tok")
    out = tmp_path / "out"
    args = ["convert", "to-hf", str(converted["root"] / "ckpt"), str(out), "--tokenizer", str(tmp_path / "tok"),
            "--no-progress"]
    assert main(args) == 0
    assert len(AutoTokenizer.from_pretrained(out)) == 200
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert config["vocab_size"] == 250  # the model's vocab, not the smaller tokenizer's
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
