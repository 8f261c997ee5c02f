"""prepare-data throughput on the sample corpus: MB/s of text in and tokens/s out.

    python benchmarks/prepare_throughput.py [--data data/sample] [--workers 2]

Tokenises the sample corpus's extracted ``code`` documents (``<data>/raw/code-*.jsonl``) once with the
``bytes`` tokenizer and once with a byte-level BPE tokenizer (vocab 8192) trained locally with the
``tokenizers`` library on part of the same text; the tokenizer's training time is not counted. Prints
a table; ``--out F`` writes the JSON (recorded results: ``benchmarks/results/prepare_throughput.json``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


from data_pipeline.prepare import PrepareOptions, prepare_data
from data_pipeline.sample_data import ensure_sample_data


def train_tokenizer(files: list[str], out: Path, vocab_size: int = 8192) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for f in files[:1]:
        with open(f) as fh:
            texts += [json.loads(line)["text"] for line in fh]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/sample")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the result JSON here (e.g. benchmarks/results/prepare_throughput.json "
                    "to record it); default: print the table only")
    args = ap.parse_args()
    ensure_sample_data(args.data, progress=False)
    files = sorted(glob.glob(f"{args.data}/raw/code-*.jsonl"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(files, Path(tmp) / "bpe")
        for name, spec in (("bytes", "bytes"), ("hf-bpe-8192", str(Path(tmp) / "bpe"))):
            t0 = time.perf_counter()
            stats = prepare_data(PrepareOptions(inputs=files, output=f"{tmp}/out-{name}", source="code",
                                                tokenizer=spec, workers=args.workers, progress=False))
            seconds = time.perf_counter() - t0
            rows.append({"tokenizer": name, "seconds": seconds, "text_bytes": stats["text_bytes"],
                         "tokens": stats["tokens"], "mb_per_s": stats["text_bytes"] / 1e6 / seconds,
                         "tokens_per_s": stats["tokens"] / seconds, "members": stats["members"]})
    print(f"{'tokenizer':<14}{'MB text':>10}{'tokens':>14}{'seconds':>10}{'MB/s in':>10}{'tokens/s':>14}")
    for r in rows:
        print(f"{r['tokenizer']:<14}{r['text_bytes'] / 1e6:>10.1f}{r['tokens']:>14,}{r['seconds']:>10.2f}"
              f"{r['mb_per_s']:>10.2f}{r['tokens_per_s']:>14,.0f}")
    import tokenizers
    import zstandard

    result = {"command": " ".join([Path(sys.executable).name] + sys.argv),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "versions": {"python": platform.python_version(), "tokenizers": tokenizers.__version__,
                           "zstandard": zstandard.__version__},
              "config": {"inputs": files, "workers": args.workers, "member_tokens": 262144}, "results": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
