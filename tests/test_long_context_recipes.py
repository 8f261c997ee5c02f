"""The long-context recipes (configs/long_context/): the 1B hybrid of configs/1b.yaml at 32k, 64k and 128k tokens
per sequence with context parallelism. Their model is the 4k run's (its checkpoint is their starting point), each
plans at its GPU counts, the memory their comments state is the dry run's estimate, and they start from the 4k
run's weights alone, naming the checkpoint they need when it is missing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hybrid_megatron.cli import main
from hybrid_megatron.config import load_run_config
from hybrid_megatron.config_io import to_dict
from hybrid_megatron.training.dry_run import peak_memory_bytes

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {32: 2, 64: 4, 128: 8}  # thousands of tokens per sequence: CP
FRESH = ["checkpoint.load=null", "checkpoint.load_weights_only=false"]  # plan without the 4k run's checkpoint


def _path(k: int) -> Path:
    return ROOT / "configs" / "long_context" / f"1b_{k}k.yaml"


def _cfg(k: int, *overrides: str):
    return load_run_config(_path(k), [*FRESH, *overrides])


@pytest.mark.parametrize("k", RECIPES)
def test_the_model_is_the_4k_runs_and_each_gpu_holds_16k_tokens(k):
    cfg, base = _cfg(k), load_run_config(ROOT / "configs" / "1b.yaml")
    assert to_dict(cfg.model) == to_dict(base.model)
    assert cfg.data.seq_len == k * 1024 and cfg.parallel.context_parallel_size == RECIPES[k]
    assert cfg.data.seq_len // cfg.parallel.context_parallel_size == 16384
    recipe = load_run_config(_path(k))
    assert recipe.checkpoint.load == "runs/1b/checkpoints" and recipe.checkpoint.load_weights_only
    assert recipe.data.reset_at_document_boundaries and recipe.data.document_multiple == 2 * RECIPES[k]


@pytest.mark.parametrize("k", RECIPES)
def test_the_memory_the_comments_state_is_the_dry_runs_estimate(k):
    text = _path(k).read_text()
    stated = float(re.search(r"same on 8 GPUs: about (\d+) GB", text).group(1))
    readme = float(re.search(r"about\s+(\d+) GB per GPU on 8 GPUs by the dry run", (ROOT / "README.md").read_text()).group(1))
    assert peak_memory_bytes(_cfg(k), world_size=8) / 1e9 == pytest.approx(stated, abs=0.5) == readme
    fewer = re.search(r"fewer GPUs: (\S+) (\S+) \(about (\d+) GB per GPU", text)
    if fewer:
        cfg = _cfg(k, fewer.group(1), fewer.group(2))
        assert peak_memory_bytes(cfg, world_size=cfg.parallel.context_parallel_size) / 1e9 == pytest.approx(
            float(fewer.group(3)), abs=0.5)


@pytest.mark.parametrize("k", RECIPES)
def test_each_recipe_plans_from_its_fewest_gpus_to_eight(k, capsys):
    cp = RECIPES[k]
    for gpus in sorted({cp, 8}):
        assert main(["pretrain", str(_path(k)), *FRESH, "--dry-run", "--gpus", str(gpus)]) == 0
        out = capsys.readouterr().out
        assert f"{gpus} GPUs = TP 1 x PP 1 x CP {cp} x DP {gpus // cp}" in out and "fits an 80 GB H100" in out


def test_without_the_4k_checkpoint_the_recipe_names_what_it_needs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", str(_path(32)), "build_sample_data=false", "--dry-run"]) == 2
    assert "checkpoint.load=runs/1b/checkpoints: no such checkpoint directory" in capsys.readouterr().err


def test_the_padding_losses_docs_cluster_states_are_the_loaders():
    """docs/cluster.md states the share of tokens document padding pushes out of the rows of each recipe on the
    sample data over the first 5 steps: the loader's own count (within 30%: the sample data is drawn from the
    Python standard library, which differs a little between Python builds)."""
    from data_pipeline.loader import build_loader
    from data_pipeline.sample_data import ensure_sample_data

    text = (ROOT / "docs" / "cluster.md").read_text()
    stated = [float(x) for x in re.search(r"pushed ([0-9.]+)%, ([0-9.]+)% and ([0-9.]+)% of the tokens", text).groups()]
    for k, want in zip(RECIPES, stated):
        cfg = _cfg(k, "data.num_workers=0")
        ensure_sample_data(ROOT / "data" / "sample", progress=False)
        loader = build_loader(cfg.data, 0, 1)
        try:
            batches = [next(loader) for _ in range(5)]
        finally:
            loader.close()
        got = 100 * sum(b.dropped_tokens for b in batches) / sum(b.num_tokens for b in batches)
        assert got == pytest.approx(want, rel=0.3), (k, got)
