"""The quickstart's own export: a checkpoint of a run on bytes-tokenised data (no model.vocab_size set)
converts with no flags, ships tokenizer files whose ids are the data pipeline's, and generates text."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from data_pipeline.tokenizer import ByteTokenizer
from hybrid_megatron.checkpoint import layout
from hybrid_megatron.cli import main
from tests.checkpoint_helpers import quickstart_checkpoint
TEXT = "def naïve(): return '東京 🚀'\n\ttabs and  spaces"


@pytest.fixture(scope="module")
def quickstart_ckpt(tmp_path_factory):
    """The fixture checkpoint as `pretrain configs/tiny.yaml` leaves it: vocab_size unset in the run config,
    the data's tokenizer recorded beside it."""
    return quickstart_checkpoint(tmp_path_factory.mktemp("run") / "checkpoints")


def test_without_a_record_the_export_still_asks_for_a_tokenizer(quickstart_ckpt, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(quickstart_ckpt, bare)
    (bare / "step-000000" / layout.DATA_TOKENIZER).unlink()
    assert main(["convert", "to-hf", str(bare), str(tmp_path / "out"), "--no-progress"]) == 2
    assert "records neither model.vocab_size nor the data's tokenizer" in capsys.readouterr().err


def test_exports_without_flags_and_round_trips_text_through_auto_tokenizer(quickstart_ckpt, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    assert main(["convert", "to-hf", str(quickstart_ckpt), str(out), "--no-progress"]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert ids == ByteTokenizer().encode_batch([TEXT])[0].tolist() == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT and tok.eos_token_id == ByteTokenizer.eos_id
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 257 and config["eos_token_id"] == 256


def test_the_exported_model_generates_text(quickstart_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    assert main(["convert", "to-hf", str(quickstart_ckpt), str(out), "--dtype", "fp32", "--no-progress"]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompt = tok("def ", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(generated[0], skip_special_tokens=True)
    assert text.startswith("def ") and len(text) > len("def ")
    print(repr(text))
