"""What a conversion fixture is (no CUDA): layouts, the tiny model, the input windows, the reference
contract and the checks. Shared by tools/make_convert_fixtures.py (the driver), devtools/fixture_worker.py
(the GPU side) and tests/test_gpu_scripts_cpu.py."""

from __future__ import annotations

from pathlib import Path

from hybrid_megatron.devtools import REPO_ROOT as ROOT

BATCH, SEQ, PROMPT_LEN, NEW_TOKENS = 2, 150, 70, 20
WINDOW_STRIDE = 997  # token offset between the two input rows inside the source stream
STEP_DIR = "step-000000"
MAX_FIXTURE_BYTES = 1_600_000  # per fixture: the six stay under 10 MB
FIXTURES = {  # name -> layout; the pattern is cut for PP=2 into 3 + 4 layers (an uneven split)
    "tp1": {"tp": 1, "pp": 1},
    "tp2": {"tp": 2, "pp": 1},
    "pp2": {"tp": 1, "pp": 2},
    "moe": {"tp": 1, "pp": 1},
    "moe-tp2": {"tp": 2, "pp": 1},  # with sequence parallelism, which megatron's MoE dispatcher needs under TP
    "moe-pp2": {"tp": 1, "pp": 2},
}
MODEL = {  # ~0.18M parameters: hidden 64, 4 Mamba heads of 32 (2 groups, state 16), 4 attention heads (2 KV)
    "hybrid_layer_pattern": "M-*|M-M-",
    "hidden_size": 64,
    "ffn_hidden_size": 128,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "mamba_head_dim": 32,
    "mamba_num_groups": 2,
    "mamba_state_dim": 16,
    "mamba_chunk_size": 64,
    "vocab_size": 257,  # the bytes tokenizer of the sample data
    "make_vocab_size_divisible_by": 8,  # 264 rows: small logits, divisible by TP=2
    "layer_spec": "te",
}


# fixtures of another model: these fields replace MODEL's. "moe": NemotronH-style MoE layers (sigmoid top-2 routing
# with an expert bias, a shared expert); MoE needs TE's grouped GEMM, so its reference is the TE model's (TF32)
_MOE = {"hybrid_layer_pattern": "ME*|MEM-", "moe_num_experts": 4, "moe_top_k": 2, "moe_ffn_hidden_size": 64,
        "moe_shared_expert_size": 64, "moe_expert_bias": True}
MODEL_CHANGES = {name: _MOE for name in ("moe", "moe-tp2", "moe-pp2")}
TE_REFERENCE = ("moe", "moe-tp2", "moe-pp2")


def model_fields(name: str) -> dict:
    """The ``model:`` fields of fixture ``name``."""
    return {**MODEL, **MODEL_CHANGES.get(name, {})}


def nproc(name: str) -> int:
    return FIXTURES[name]["tp"] * FIXTURES[name]["pp"]


def overrides(name: str, run_dir: Path, steps: int, layout: dict | None = None) -> list[str]:
    """Dotlist overrides of configs/tiny.yaml for a fixture (``layout`` replaces the fixture's TP/PP)."""
    layout = layout or FIXTURES[name]
    out = [f"model.{k}={v}" for k, v in model_fields(name).items()]
    out += [
        "precision.dtype=fp32",
        # TE runs fp32 attention only through its unfused backend, which has no packed (thd) path
        "data.reset_at_document_boundaries=false",
        f"parallel.tensor_model_parallel_size={layout['tp']}",
        f"parallel.pipeline_model_parallel_size={layout['pp']}",
        *(["parallel.sequence_parallel=true"] if layout["tp"] > 1 and "E" in model_fields(name)["hybrid_layer_pattern"]
          else []),
        f"train.train_steps={steps}",
        f"schedule.lr_warmup_steps={max(1, steps // 6)}",
        "logging.log_interval=10",
        "logging.tensorboard=false",
        f"logging.run_dir={run_dir}",
    ]
    return out


def load_config(name: str, run_dir: Path, steps: int, layout: dict | None = None):
    from hybrid_megatron.config import load_run_config

    return load_run_config(ROOT / "configs" / "tiny.yaml", overrides(name, run_dir, steps, layout))


def windows_from_tokens(tokens, batch: int = BATCH, seq: int = SEQ, stride: int = WINDOW_STRIDE):
    """Rows ``tokens[i*stride : i*stride + seq]`` as a LongTensor [batch, seq]."""
    import numpy as np
    import torch

    need = (batch - 1) * stride + seq
    if len(tokens) < need:
        raise ValueError(f"need {need} tokens for {batch} windows of {seq}, the source gave {len(tokens)}")
    rows = [np.asarray(tokens[i * stride: i * stride + seq], dtype=np.int64) for i in range(batch)]
    return torch.from_numpy(np.stack(rows))


def sample_tokens(source_dir: Path, count: int):
    """The first ``count`` tokens of a prepare-data source (members in index order)."""
    import numpy as np

    from data_pipeline.shards import MemberReader, SourceIndex

    reader = MemberReader(SourceIndex.open(source_dir))
    parts, have = [], 0
    try:
        for member in range(reader.index.num_members):
            parts.append(np.array(reader.read(member)))
            have += len(parts[-1])
            if have >= count:
                break
    finally:
        reader.close()
    return np.concatenate(parts)[:count]


def check_reference(ref: dict, vocab_size: int, padded_vocab: int, chunk_size: int) -> None:
    """Raises ValueError where ``ref`` breaks the fixture contract of tests/test_convert_parity.py."""
    import torch

    missing = {"input_ids", "logits", "greedy_ids", "prompt_len"} - set(ref)
    if missing:
        raise ValueError(f"reference lacks {sorted(missing)}")
    ids, logits, greedy, p = ref["input_ids"], ref["logits"], ref["greedy_ids"], ref["prompt_len"]
    if ids.dtype != torch.long or ids.dim() != 2:
        raise ValueError(f"input_ids must be a 2-D LongTensor, got {ids.dtype} {tuple(ids.shape)}")
    b, s = ids.shape
    if not (s > chunk_size and s % chunk_size):
        raise ValueError(f"S={s} must exceed and not be a multiple of mamba_chunk_size={chunk_size}")
    if logits.dtype != torch.float32 or tuple(logits.shape) != (b, s, padded_vocab):
        raise ValueError(f"logits must be float32 [{b}, {s}, {padded_vocab}], got {logits.dtype} {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits hold non-finite values")
    if not isinstance(p, int) or not 0 < p <= s:
        raise ValueError(f"prompt_len={p!r} must be an int in (0, {s}]")
    if greedy.dtype != torch.long or tuple(greedy.shape) != (b, p + NEW_TOKENS):
        raise ValueError(f"greedy_ids must be a LongTensor [{b}, {p + NEW_TOKENS}], got {tuple(greedy.shape)}")
    if not torch.equal(greedy[:, :p], ids[:, :p]):
        raise ValueError("greedy_ids does not start with the prompt input_ids[:, :prompt_len]")
    if int(greedy[:, p:].max()) >= vocab_size or int(ids.max()) >= vocab_size:
        raise ValueError(f"token ids must be < vocab_size={vocab_size}")


def write_reference(path: Path, input_ids, logits, greedy_ids, prompt_len: int) -> None:
    import torch

    ref = {"input_ids": input_ids.cpu().long().contiguous(), "logits": logits.cpu().float().contiguous(),
           "greedy_ids": greedy_ids.cpu().long().contiguous(), "prompt_len": int(prompt_len)}
    torch.save(ref, path)


def check_fixture(root: Path, max_bytes: int = MAX_FIXTURE_BYTES) -> dict:
    """Contract + checkpoint layout + size of ``root`` (CPU only); returns sizes."""
    import torch

    from hybrid_megatron.checkpoint import layout, offline
    from hybrid_megatron.model.build import padded_vocab_size

    step_dir = layout.resolve_step_dir(root / "ckpt")
    model = offline.load_model_config(step_dir)
    state = layout.read_train_state(step_dir)
    if state != {"weights_only": True, "step": 0}:
        raise ValueError(f"{step_dir}/train_state.json is {state}, expected weights_only at step 0")
    steps = [p.name for p in (root / "ckpt").iterdir() if p.is_dir()]
    if steps != [step_dir.name]:
        raise ValueError(f"{root}/ckpt holds {steps}: exactly one step dir expected")
    ref = torch.load(root / "reference.pt", weights_only=True)
    check_reference(ref, model.vocab_size, padded_vocab_size(model.vocab_size, model, 1), model.mamba_chunk_size)
    sizes = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    total = sum(sizes.values())
    if total > max_bytes:
        raise ValueError(f"{root} is {total:,} bytes, over the {max_bytes:,}-byte budget per fixture")
    return {"bytes": total, "files": len(sizes), "ckpt_bytes": sum(v for k, v in sizes.items() if k.startswith("ckpt"))}


EMBEDDING_KEY = "embedding.word_embeddings.weight"
