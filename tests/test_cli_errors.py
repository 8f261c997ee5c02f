"""Every mistake a user can make on the command line ends in one line on stderr and exit 2 or 3."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hybrid_megatron import __version__
from hybrid_megatron.cli import main
from hybrid_megatron.devtools import REPO_ROOT

TINY = str(REPO_ROOT / "configs" / "tiny.yaml")


@pytest.mark.parametrize("argv,code,message", [
    (["pretrain", "{empty}", "--dry-run"], 2, "missing required keys model, data"),
    (["pretrain", str(REPO_ROOT / "configs"), "--dry-run"], 2, "is a directory, not a config file"),
    (["pretrain", "no/such.yaml", "--dry-run"], 2, "relative paths resolve against the working directory"),
    (["pretrain", TINY, "optim.lr=nan", "--dry-run"], 2, "optim.lr=nan: must be a finite number"),
    (["pretrain", TINY, "optim.lr=.inf", "--dry-run"], 2, "optim.lr=inf: must be a finite number"),
    (["pretrain", TINY, f"model.hidden_size={10**9}", "--dry-run"], 2, "implausibly large"),
    (["pretrain", TINY, "checkpoint.load=/nonexistent", "--dry-run"], 2, "checkpoint.load=/nonexistent: no such"),
    (["data", "audit", TINY, "--steps", "3", "--dp-size", "0"], 2, "--dp-size 0: must be >= 1"),
    (["data", "audit", TINY, "--steps", "3", "--dp-size", "-2"], 2, "--dp-size -2: must be >= 1"),
    (["data", "audit", TINY, "--steps", "3", "--state-out", "/missing/dir/s.json"], 2, "does not exist"),
    (["prepare-data", "--input", TINY, "--output", "{tmp}/o", "--source", "s", "--shard-bytes", "0"], 2,
     "--shard-bytes 0: must be at least 1"),
    (["convert", "to-hf", str(REPO_ROOT / "tests/fixtures/convert/tp1/ckpt"), "{tmp}/o", "--max-shard-size-gb", "0"],
     2, "--max-shard-size-gb: must be > 0"),
    (["convert", "to-hf", str(REPO_ROOT / "tests/fixtures/convert/tp1/ckpt"), "{tmp}/o", "--tokenizer", "/missing"],
     2, "--tokenizer /missing: no such directory"),
    (["convert", "to-hf", str(REPO_ROOT / "tests/fixtures/convert/tp1/ckpt"), "{tmp}/o", "--tokenizer",
      "someone/not-cached-tokenizer"], 2, "not in the Hugging Face cache"),
    (["convert", "from-hf", "{badhf}", "{tmp}/o"], 3, "config.json: not valid JSON"),
])
def test_one_line_and_an_exit_code(tmp_path, capsys, monkeypatch, argv, code, message):
    monkeypatch.chdir(REPO_ROOT)
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "badhf").mkdir()
    (tmp_path / "badhf" / "config.json").write_text("{ not json")
    argv = [a.replace("{empty}", str(tmp_path / "empty.yaml")).replace("{tmp}", str(tmp_path))
            .replace("{badhf}", str(tmp_path / "badhf")) for a in argv]
    assert main(argv) == code
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("20")]  # log lines
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_model_vocab_below_the_datas_is_refused_by_the_dry_run(capsys, monkeypatch):
    from data_pipeline.sample_data import ensure_sample_data

    monkeypatch.chdir(REPO_ROOT)
    ensure_sample_data(progress=False)
    assert main(["pretrain", TINY, "model.vocab_size=100", "--dry-run"]) == 2
    assert "model.vocab_size=100 is smaller than the data's vocabulary (257)" in capsys.readouterr().err


def test_log_level_is_checked_and_accepted_after_the_verb(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--log-level", "FOO", "pretrain", TINY, "--dry-run"])
    assert exc.value.code == 2 and "invalid choice: 'FOO'" in capsys.readouterr().err
    assert main(["pretrain", TINY, "--dry-run", "--log-level", "warning"]) == 0


def test_version():
    proc = subprocess.run([sys.executable, "-m", "hybrid_megatron", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"hybrid-megatron {__version__}"


def test_a_reader_that_leaves_early_ends_quietly(tmp_path):
    """`data audit ... | head -c 600` (as docs/data.md shows): no BrokenPipeError traceback."""
    from data_pipeline.sample_data import ensure_sample_data

    ensure_sample_data(REPO_ROOT / "data" / "sample", progress=False)
    cmd = f"{sys.executable} -m hybrid_megatron data audit {TINY} --steps 40 --num-workers 0 | head -c 600 > /dev/null"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode in (0, 1)


def test_audit_past_the_end_of_the_run_says_so(capsys, monkeypatch):
    from data_pipeline.sample_data import ensure_sample_data

    monkeypatch.chdir(REPO_ROOT)
    ensure_sample_data(progress=False)
    assert main(["data", "audit", TINY, "--steps", "100000", "--num-workers", "0"]) == 0
    captured = capsys.readouterr()
    assert "the run ends after step 621" in captured.err
    assert captured.out.count("\n") == 621


def test_building_the_command_line_loads_no_heavy_library():
    """Every verb registers its parser at start-up: `hybrid-megatron --help` and a typo must answer at once."""
    code = ("import sys; from hybrid_megatron.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'megatron', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.strip() == "[]", out.stdout
