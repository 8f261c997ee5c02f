"""A fake cluster for the tests of slurm/pretrain_7b.sh: fake `sbatch`, `srun`, `scontrol` and `hybrid-megatron` on PATH.

The fakes emulate what the script relies on, no more:
  sbatch         reads the #SBATCH lines and its own flags (flags win), sets the SLURM_* variables of
                 the allocation, copies the script to a spool directory (as slurmd does) and runs it
                 there in the foreground; fails, like Slurm, when the log directory is missing.
  srun           records its argv, checks the pyxis flags (image given, mount sources exist), starts
                 one task per SLURM_NTASKS with SLURM_PROCID/SLURM_LOCALID/SLURM_NODEID set,
                 forwards USR1/TERM to them and exits with the highest task exit code.
  scontrol       `show hostnames` expands node lists; `requeue` is recorded.
  hybrid-megatron  records argv and environment per rank; by FAKE_TRAIN_MODE: finish (exit 0),
                 exit:N, or wait (until USR1/TERM, then rank 0 commits a checkpoint, exit 75).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "pretrain_7b.sh"
JOB_ID = 4242

FAKE_SBATCH = r'''
import os, re, shutil, subprocess, sys, tempfile
args = sys.argv[1:]
opts, i = {}, 0
while i < len(args) and args[i].startswith("-"):
    key, _, val = args[i][2:].partition("=")
    opts[key] = val or "1"
    i += 1
script, script_args = args[i], args[i + 1:]
header = {}
for line in open(script):
    if not line.startswith("#") and line.strip():
        break  # sbatch stops reading directives at the first command
    m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
    if m:
        header[m.group(1)] = m.group(2) or "1"
header.update(opts)  # command-line flags win over #SBATCH lines
nodes = int(header["nodes"])
tpn = int(header["ntasks-per-node"])
job_id = os.environ.get("FAKE_JOB_ID", "4242")
name = header.get("job-name", "sbatch")
env = dict(os.environ)
env.update({
    "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": name, "SLURM_SUBMIT_DIR": os.getcwd(),
    "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NNODES": str(nodes),
    "SLURM_NTASKS": str(nodes * tpn), "SLURM_NTASKS_PER_NODE": str(tpn),
    "SLURM_GPUS_ON_NODE": header.get("gpus-per-node", "8"),
    "SLURM_CPUS_ON_NODE": os.environ.get("FAKE_CPUS_ON_NODE", "128"),
    "SLURM_JOB_NODELIST": os.environ.get("FAKE_NODELIST", f"gpu[{101:03d}-{100 + nodes:03d}]"),
})
if os.environ.get("FAKE_RESTART_COUNT"):
    env["SLURM_RESTART_COUNT"] = os.environ["FAKE_RESTART_COUNT"]
log = os.path.join(os.environ["FAKE_SLURM_LOG"], "sbatch.header")
with open(log, "w") as f:
    f.write("\n".join(f"{k}={v}" for k, v in sorted(header.items())))
out = header["output"].replace("%x", name).replace("%j", job_id)
if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    sys.exit(f"sbatch(fake): log directory of {out} does not exist: the job would fail unseen")
spool = tempfile.mkdtemp(prefix="slurmd-spool-")
copy = os.path.join(spool, "slurm_script")
shutil.copy(script, copy)
with open(out, "a") as f:
    proc = subprocess.Popen(["bash", copy, *script_args], env=env, stdout=f, stderr=subprocess.STDOUT)
    open(os.path.join(os.environ["FAKE_SLURM_LOG"], "batch.pid"), "w").write(str(proc.pid))
    sys.exit(proc.wait())
'''

FAKE_SRUN = r'''
import json, os, signal, subprocess, sys
log = os.environ["FAKE_SLURM_LOG"]
args = sys.argv[1:]
with open(os.path.join(log, "srun.argv"), "a") as f:
    f.write(json.dumps(args) + "\n")
opts, i = {}, 0
while args[i].startswith("--"):
    key, _, val = args[i][2:].partition("=")
    opts[key] = val
    i += 1
cmd = args[i:]
if not opts.get("container-image"):
    sys.exit("srun(fake): no --container-image")
for mount in opts.get("container-mounts", "").split(","):
    if mount and not os.path.exists(mount.split(":")[0]):
        sys.exit(f"pyxis: --container-mounts: source path does not exist: {mount}")
ntasks = int(os.environ["SLURM_NTASKS"])
nnodes = int(os.environ["SLURM_JOB_NUM_NODES"])
tpn = ntasks // nnodes
procs = []
for rank in range(ntasks):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % tpn),
               SLURM_NODEID=str(rank // tpn), SLURM_STEP_NUM_TASKS=str(ntasks))
    procs.append(subprocess.Popen(cmd, env=env))
def forward(signum, frame):
    with open(os.path.join(log, "srun.signals"), "a") as f:
        f.write(signal.Signals(signum).name + "\n")
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)
signal.signal(signal.SIGUSR1, forward)
signal.signal(signal.SIGTERM, forward)
codes = [p.wait() for p in procs]
# like srun: the highest exit code; a task killed by a signal ranks below any exit code
sys.exit(max((c for c in codes if c > 0), default=1 if any(c < 0 for c in codes) else 0))
'''

FAKE_SCONTROL = r'''
import os, re, sys
log = os.environ["FAKE_SLURM_LOG"]
args = sys.argv[1:]
if args[:2] == ["show", "hostnames"]:
    m = re.fullmatch(r"([\w-]+)\[(.+)\]", args[2])
    if not m:
        print(args[2]); sys.exit(0)
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        for n in range(int(lo), int(hi or lo) + 1):
            print(f"{m.group(1)}{n:0{len(lo)}d}")
elif args[0] == "requeue":
    with open(os.path.join(log, "scontrol.requeue"), "a") as f:
        f.write(args[1] + "\n")
    sys.exit(int(os.environ.get("FAKE_REQUEUE_RC", "0")))
else:
    sys.exit(f"scontrol(fake): unsupported {args}")
'''

FAKE_TRAINER = r'''
import json, os, signal, sys, time
log = os.environ["FAKE_SLURM_LOG"]
rank = int(os.environ["SLURM_PROCID"])
restart = os.environ.get("SLURM_RESTART_COUNT", "0")
run_dir = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("logging.run_dir="))
ckpt = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("checkpoint.save_dir=")),
            os.path.join(run_dir, "checkpoints"))
latest = os.path.join(ckpt, "latest")
record = {"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(),
          "resumed_from": open(latest).read().strip() if os.path.exists(latest) else None}
got = []
def on_signal(signum, frame):
    got.append(signal.Signals(signum).name)
signal.signal(signal.SIGUSR1, on_signal)
signal.signal(signal.SIGTERM, on_signal)
path = os.path.join(log, f"run{restart}-rank{rank}.json")
json.dump(record, open(path, "w"))
mode = os.environ.get("FAKE_TRAIN_MODE", "finish")
if mode.startswith("exit:"):
    sys.exit(int(mode[5:]))
if mode == "wait":
    deadline = time.time() + 20
    while not got and time.time() < deadline:
        time.sleep(0.02)
    if not got:
        sys.exit(1)
    record["signals"] = got
    json.dump(record, open(path, "w"))
    if rank == 0:  # the real trainer commits after a barrier; the fake only needs the pointer
        step = int(record["resumed_from"] or 0) + 1
        os.makedirs(ckpt, exist_ok=True)
        open(latest + ".tmp", "w").write(str(step))
        os.replace(latest + ".tmp", latest)
    sys.exit(75)
'''


def cluster_at(tmp_path: Path):
    """A fake cluster under tmp_path (a generator, for the ``cluster`` fixture in conftest.py): fake
    binaries first on PATH, a log dir, a data dir and an image file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in [("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL),
                       ("hybrid-megatron", FAKE_TRAINER)]:
        exe = bin_dir / name
        exe.write_text(f"#!{sys.executable}\n{body}")
        exe.chmod(0o755)
    log = tmp_path / "log"
    log.mkdir()
    (tmp_path / "data").mkdir()
    image = tmp_path / "hybrid-megatron.sqsh"
    image.write_bytes(b"hsqs")
    config = tmp_path / "configs" / "run.yaml"
    config.parent.mkdir()
    config.write_text("model: {}\n")
    # the developer's or CI's own settings must not leak into what the tests assert
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "FAKE_", "NCCL_", "TORCH_NCCL_", "PYXIS_"))}
    env.update({
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
        "FAKE_SLURM_LOG": str(log),
        "CONFIG": str(config),
        "RUN_DIR": str(tmp_path / "runs" / "r1"),
        "CONTAINER_IMAGE": str(image),
        "DATA_DIR": str(tmp_path / "data"),
    })
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "REPO_DIR",
                 "OVERRIDES", "CKPT_DIR", "MAX_REQUEUES", "REQUEUE_ON_TERM", "SRUN_ARGS", "CONTAINER_MOUNTS",
                 "CPUS_PER_TASK", "KILL_ON_BAD_EXIT", "CUDA_DEVICE_MAX_CONNECTIONS", "OMP_NUM_THREADS"):
        env.pop(name, None)

    class Cluster:
        path = tmp_path
        run_dir = tmp_path / "runs" / "r1"

        def __init__(self):
            self.env = env

        def sbatch(self, *flags, script_args=(), extra_env=None, background=False):
            """`sbatch FLAGS slurm/pretrain_7b.sh SCRIPT_ARGS` from the repository root."""
            cmd = ["sbatch", *flags, str(SCRIPT), *script_args]
            proc_env = dict(self.env, **(extra_env or {}))
            proc = subprocess.Popen(cmd, env=proc_env, cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            return proc if background else finish(proc)

        def ranks(self, restart=0):
            files = sorted(log.glob(f"run{restart}-rank*.json"), key=lambda p: int(p.stem.split("rank")[1]))
            return [json.loads(p.read_text()) for p in files]

        def srun_calls(self):
            f = log / "srun.argv"
            return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []

        def requeues(self):
            f = log / "scontrol.requeue"
            return f.read_text().split() if f.exists() else []

        def job_log(self, name="hybrid-7b"):
            return (REPO / "slurm" / "logs" / f"{name}-{JOB_ID}.out").read_text()

    yield Cluster()
    for f in (REPO / "slurm" / "logs").glob(f"*-{JOB_ID}.out"):
        f.unlink()


def finish(proc, timeout=60):
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def split_srun(argv):
    """(srun options as a dict, the task command) from one recorded srun argv."""
    i = next(i for i, a in enumerate(argv) if not a.startswith("--"))
    return dict(a[2:].partition("=")[::2] for a in argv[:i]), argv[i:]
