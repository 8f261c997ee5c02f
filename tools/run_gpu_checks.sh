#!/usr/bin/env bash
# GPU checks in one command, each stage under `timeout`, results gathered into $OUT.
#
#   tools/run_gpu_checks.sh [STAGE ...]        stages: tests fixtures (default: both, in order)
#
#   tests     the GPU pytest files (tests/test_gpu_*.py but *_cpu.py; GPU_TESTS="a.py b.py"
#             picks some)                                                              -> pytest_gpu.log/.xml
#   fixtures  tools/make_convert_fixtures.py: tp1 on one GPU; tp2 and pp2 only when
#             `nvidia-smi -L` lists two or more GPUs. FIXTURES=tp2,pp2 picks some     -> convert_fixtures.tar,
#             (one at a time keeps a call inside 10 min: ~7 min each on an H100),       fixtures_summary.json,
#             FIXTURE_STEPS=N overrides the training steps (the driver's default)       fixtures_logs.tar
#   (the parity of the fixtures with transformers is a CPU test, tests/test_convert_parity.py: here
#   transformers would pick the installed mamba-ssm/causal-conv1d CUDA kernels for its CPU tensors)
#
# Every stage is bounded (seconds, overridable): TESTS_TIMEOUT=480 FIXTURES_TIMEOUT=480:
# run `tests` and `fixtures` as separate calls to stay inside 10 minutes each, or PARALLEL=1 runs the
# stages at the same time (the tiny models leave the GPU mostly idle). TESTS_WORKERS=N runs the tests
# in N pytest-xdist workers when xdist is importable.
# gpu_checks_summary.json is rewritten after every stage. At most 7 files land in $OUT, none in folders.
# Run from the project root with the GPU extra importable (installed, or on PYTHONPATH).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
WORK=${WORK:-/tmp/gpu_checks}
mkdir -p "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests fixtures)
for s in "${STAGES[@]}"; do
  case "$s" in tests|fixtures) ;; *) echo "usage: $0 [tests] [fixtures]  (unknown stage: $s)" >&2; exit 2 ;; esac
done
RECORD="$WORK/stages.tsv"
: > "$RECORD"
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)

summarize() {  # stages.tsv + the stage outputs -> $OUT/gpu_checks_summary.json
  "$PY" - "$RECORD" "$OUT" "$NGPU" <<'EOF'
import json, os, sys, xml.etree.ElementTree as ET
record, out, ngpu = sys.argv[1], sys.argv[2], int(sys.argv[3] or 0)
stages = []
for line in open(record):
    name, rc, seconds, note = (line.rstrip("\n").split("\t") + [""])[:4]
    stages.append({"stage": name, "exit": int(rc), "seconds": int(seconds), "timed_out": rc in ("124", "137"),
                   "note": note})
summary = {"gpus": ngpu, "stages": stages}
xml = os.path.join(out, "pytest_gpu.xml")
if os.path.isfile(xml):
    try:
        suites = ET.parse(xml).getroot()
        suites = [suites] if suites.tag == "testsuite" else list(suites)
        counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
        summary["gpu_tests"] = {**counts, "failed": failed}
    except ET.ParseError as exc:
        summary["gpu_tests"] = {"error": f"unreadable junit xml: {exc}"}
fx = os.path.join(out, "fixtures_summary.json")
if os.path.isfile(fx):
    data = json.load(open(fx))
    summary["fixtures"] = {r["name"]: {k: r.get(k) for k in ("status", "error", "trained_by", "bytes",
                           "reload_max_abs_diff", "te_tf32_max_abs_diff", "reference_precision", "loss_first", "loss_last")}
                           for r in data.get("fixtures", [])}
    summary["fixtures_total_bytes"] = data.get("total_bytes")
with open(os.path.join(out, "gpu_checks_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary, indent=1)[:3000])
EOF
}

run_stage() {  # run_stage NAME TIMEOUT_S NOTE CMD...
  local name=$1 limit=$2 note=$3 start rc
  shift 3
  echo "=== $name (limit ${limit}s): $*"
  start=$(date +%s)
  # SIGINT first: pytest then prints its failure reports and writes the junit XML, and the Python drivers
  # kill the process sessions they started; SIGKILL 30 s later if that hangs
  timeout -s INT --kill-after=30 "$limit" "$@"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$note" >> "$RECORD"
  echo "=== $name: exit $rc after $(( $(date +%s) - start ))s"
  summarize > /dev/null
  return 0
}

"$PY" - <<'EOF' || echo "preflight: an import failed (see above); stages will say more"
import importlib
for m in ("torch", "megatron.core", "transformer_engine.pytorch", "mamba_ssm", "causal_conv1d", "hybrid_megatron"):
    try:
        mod = importlib.import_module(m)
        print(f"preflight: {m} {getattr(mod, '__version__', '')}")
    except Exception as exc:
        print(f"preflight: {m} FAILED: {type(exc).__name__}: {exc}")
import torch
print(f"preflight: cuda {torch.cuda.is_available()}, {torch.cuda.device_count()} GPU(s)")
EOF

stage_tests() {
  local files=() xdist=()
  if [ -n "${GPU_TESTS:-}" ]; then
    read -r -a files <<< "$GPU_TESTS"
  else
    for f in tests/test_gpu_*.py; do case "$f" in *_cpu.py) ;; *) files+=("$f") ;; esac; done
  fi
  if [ "${TESTS_WORKERS:-1}" -gt 1 ]; then
    if "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n "$TESTS_WORKERS" --dist load)
    else echo "TESTS_WORKERS=$TESTS_WORKERS: pytest-xdist is not importable; running the tests one by one"; fi
  fi
  # the tests start many short pretrain processes: one Triton autotune per kernel shape, not one per process
  run_stage tests "${TESTS_TIMEOUT:-480}" "${files[*]}" env TRITON_CACHE_AUTOTUNING=1 \
    bash -c "\"$PY\" -m pytest -v -rA --durations=0 -p no:cacheprovider ${xdist[*]} --junitxml=\"$OUT/pytest_gpu.xml\" ${files[*]} > \"$OUT/pytest_gpu.log\" 2>&1; rc=\$?; tail -n 40 \"$OUT/pytest_gpu.log\"; exit \$rc"
}

stage_fixtures() {
  local names=tp1 fixtures_dir="$WORK/fixtures" d
  [ "$NGPU" -ge 2 ] && names=tp1,tp2,pp2
  names=${FIXTURES:-$names}
  rm -rf "$fixtures_dir" "$WORK/fixture_runs"
  # the worker budget per process keeps three fixtures inside the stage limit
  run_stage fixtures "${FIXTURES_TIMEOUT:-480}" "$names" \
    "$PY" tools/make_convert_fixtures.py --fixtures "$names" --out "$fixtures_dir" --work "$WORK/fixture_runs" \
      --summary "$OUT/fixtures_summary.json" --timeout-s "${FIXTURE_PROCESS_TIMEOUT:-400}" \
      ${FIXTURE_STEPS:+--steps "$FIXTURE_STEPS"}
  # into the test tree too, for a CPU pytest run of this checkout
  if [ -d "$fixtures_dir" ]; then
    for d in "$fixtures_dir"/*/; do
      [ -f "$d/reference.pt" ] || continue
      rm -rf "tests/fixtures/convert/$(basename "$d")"
      mkdir -p tests/fixtures/convert && cp -r "$d" "tests/fixtures/convert/$(basename "$d")"
    done
    tar -C "$fixtures_dir" -cf "$OUT/convert_fixtures.tar" .
  fi
  [ -d "$WORK/fixture_runs" ] && tar -C "$WORK/fixture_runs" -cf "$OUT/fixtures_logs.tar" \
    --exclude='*/checkpoints' --exclude='*/trained' --exclude='*/tensorboard' .
  summarize > /dev/null
}

# the sample shards first, once (both stages train on them), so training starts at once
run_stage sample_data "${DATA_TIMEOUT:-180}" "data/sample" \
  "$PY" -c "from data_pipeline.sample_data import ensure_sample_data; ensure_sample_data(progress=False)"
for s in "${STAGES[@]}"; do
  if [ "${PARALLEL:-0}" = 1 ]; then "stage_$s" & else "stage_$s"; fi
done
wait
summarize
ls -la "$OUT"
