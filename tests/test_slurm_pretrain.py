"""slurm/pretrain_7b.sh on a fake cluster: fake `sbatch`, `srun`, `scontrol` and `hybrid-megatron` on PATH.

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
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tool_helpers import dev_tool

REPO = Path(__file__).resolve().parents[1]
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


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """A fake cluster: fake binaries first on PATH, a log dir, a data dir and an image file."""
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
            return proc if background else _finish(proc)

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


def _finish(proc, timeout=60):
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def _split_srun(argv):
    """(srun options as a dict, the task command) from one recorded srun argv."""
    i = next(i for i, a in enumerate(argv) if not a.startswith("--"))
    return dict(a[2:].partition("=")[::2] for a in argv[:i]), argv[i:]


# ------------------------------------------------------------------------------------------ static


def test_scripts_pass_shellcheck():
    scripts = [str(p) for p in sorted((REPO / "slurm").glob("*.sh"))]
    assert len(scripts) >= 2
    result = subprocess.run([dev_tool("shellcheck"), "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sbatch_defaults():
    header = dict(
        line.split(None, 1)[1].strip().lstrip("-").partition("=")[::2]
        for line in SCRIPT.read_text().splitlines()
        if line.startswith("#SBATCH")
    )
    assert header["ntasks-per-node"] == header["gpus-per-node"] == "8"
    assert int(header["nodes"]) >= 1
    assert "exclusive" in header and "requeue" in header
    assert header["signal"].startswith("B:USR1@") and int(header["signal"].split("@")[1]) >= 120
    assert header["open-mode"] == "append"  # a requeued job appends to its log
    assert header["output"].startswith("slurm/logs/") and (REPO / "slurm" / "logs").is_dir()
    h, m, s = map(int, header["time"].split(":"))
    assert h * 3600 + m * 60 + s > int(header["signal"].split("@")[1])


# ------------------------------------------------------------------------------------------ launch


@pytest.mark.parametrize("num_nodes", [1, 2])
def test_launch_command_and_rank_environment(cluster, num_nodes):
    result = cluster.sbatch(f"--nodes={num_nodes}", extra_env={"RANK": "5", "WORLD_SIZE": "99"})
    assert result.returncode == 0, result.stdout + cluster.job_log()
    calls = cluster.srun_calls()
    assert len(calls) == 1
    opts, task_cmd = _split_srun(calls[0])
    config = cluster.env["CONFIG"]
    assert task_cmd == ["hybrid-megatron", "pretrain", config, f"logging.run_dir={cluster.run_dir}"]
    assert opts["container-image"] == cluster.env["CONTAINER_IMAGE"]
    mounts = opts["container-mounts"].split(",")
    assert f"{REPO}:{REPO}" in mounts
    assert f"{cluster.path}/data:{cluster.path}/data:ro" in mounts
    assert f"{cluster.run_dir}:{cluster.run_dir}" in mounts
    assert f"{cluster.path}/configs:{cluster.path}/configs:ro" in mounts
    assert opts["container-workdir"] == str(REPO)
    assert opts["kill-on-bad-exit"] == "1"
    assert opts["cpus-per-task"] == "16"  # 128 cores / 8 tasks

    ranks = cluster.ranks()
    num_tasks = 8 * num_nodes
    assert len(ranks) == num_tasks
    assert sorted(int(r["env"]["SLURM_PROCID"]) for r in ranks) == list(range(num_tasks))
    assert sorted(int(r["env"]["SLURM_LOCALID"]) for r in ranks) == sorted(list(range(8)) * num_nodes)
    for r in ranks:
        env = r["env"]
        assert env["MASTER_ADDR"] == "gpu101"  # first host of gpu[101-10N]
        assert env["MASTER_PORT"] == str(10000 + JOB_ID % 20000)
        assert env["SLURM_NTASKS"] == str(num_tasks)
        # stale torchrun variables from the submitting shell must not reach the tasks
        assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & env.keys()
        assert env["NCCL_DEBUG"] == "WARN" and env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
        assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"].startswith(str(cluster.run_dir))
    assert cluster.requeues() == []

    record = cluster.run_dir / "launches" / f"{JOB_ID}-0"
    command = (record / "command.txt").read_text()
    assert command.startswith("srun ") and "hybrid-megatron pretrain" in command
    assert "MASTER_ADDR=gpu101" in (record / "env.txt").read_text()
    settings = dict(line.split("=", 1) for line in (record / "settings.txt").read_text().splitlines())
    assert settings["nodes"] == str(num_nodes) and settings["config"] == config
    assert settings["restart_count"] == "0" and settings["container_image"] == cluster.env["CONTAINER_IMAGE"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert (record / "git.txt").read_text().startswith(head.stdout.strip())


def test_nodelist_port_and_settings_from_environment(cluster):
    extra = {
        "FAKE_NODELIST": "dgx-a[07,09]", "FAKE_JOB_ID": str(JOB_ID), "FAKE_CPUS_ON_NODE": "96",
        "OVERRIDES": "train.steps=100 optim.lr=3e-4", "CKPT_DIR": str(cluster.path / "ckpt"),
        "CONTAINER_MOUNTS": f"{cluster.path}:/scratch", "MASTER_PORT": "23456",
        "SRUN_ARGS": "--no-container-mount-home", "NCCL_DEBUG": "INFO",
    }
    result = cluster.sbatch("--nodes=2", script_args=["model.num_layers=2"], extra_env=extra)
    assert result.returncode == 0, result.stdout + cluster.job_log()
    opts, task_cmd = _split_srun(cluster.srun_calls()[0])
    assert task_cmd[3:] == [
        f"logging.run_dir={cluster.run_dir}", f"checkpoint.save_dir={cluster.path}/ckpt",
        "train.steps=100", "optim.lr=3e-4", "model.num_layers=2",
    ]
    assert opts["cpus-per-task"] == "12"
    assert "no-container-mount-home" in opts
    mounts = opts["container-mounts"].split(",")
    assert f"{cluster.path}/ckpt:{cluster.path}/ckpt" in mounts and mounts[-1] == f"{cluster.path}:/scratch"
    env = cluster.ranks()[0]["env"]
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["NCCL_DEBUG"]) == ("dgx-a07", "23456", "INFO")


def test_port_is_derived_from_the_job_id():
    ports = [
        subprocess.run(["bash", "-c", f'. "{REPO}/slurm/common.sh" && hm_master_port {job}'],
                       capture_output=True, text=True, check=True).stdout.strip()
        for job in (1000, 1001, 987654)
    ]
    assert len(set(ports)) == 3
    assert all(10000 <= int(p) < 30000 for p in ports)


# ------------------------------------------------------------------------------ signals and requeue


def _wait_for(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the fake job")


def _signal_batch_script(cluster, proc, signum, num_tasks):
    """Wait until every rank is up, then signal the batch shell alone (what --signal=B: does)."""
    log = Path(cluster.env["FAKE_SLURM_LOG"])
    _wait_for(lambda: len(list(log.glob("run*-rank*.json"))) == num_tasks and (log / "batch.pid").exists())
    os.kill(int((log / "batch.pid").read_text()), signum)
    return _finish(proc)


def test_usr1_checkpoints_requeues_and_the_restart_resumes(cluster):
    proc = cluster.sbatch("--nodes=2", extra_env={"FAKE_TRAIN_MODE": "wait"}, background=True)
    result = _signal_batch_script(cluster, proc, signal.SIGUSR1, 16)
    assert result.returncode == 75, result.stdout + cluster.job_log()
    first = cluster.ranks(restart=0)
    assert all(r["signals"] == ["SIGUSR1"] for r in first)  # forwarded to every task
    assert cluster.requeues() == [str(JOB_ID)]
    assert (cluster.run_dir / "checkpoints" / "latest").read_text() == "1"
    assert "requeuing job 4242" in cluster.job_log()

    # Slurm restarts the same job: same id, SLURM_RESTART_COUNT=1, same environment.
    result = cluster.sbatch("--nodes=2", extra_env={"FAKE_RESTART_COUNT": "1"})
    assert result.returncode == 0, result.stdout + cluster.job_log()
    second = cluster.ranks(restart=1)
    assert len(second) == 16
    assert [r["argv"] for r in second] == [r["argv"] for r in first]  # the very same command
    assert not any("step" in a or "load" in a for a in second[0]["argv"])
    assert second[0]["resumed_from"] == "1"
    assert cluster.requeues() == [str(JOB_ID)]  # finishing does not requeue
    assert (cluster.run_dir / "launches" / f"{JOB_ID}-0").is_dir()
    assert (cluster.run_dir / "launches" / f"{JOB_ID}-1").is_dir()


@pytest.mark.parametrize("requeue_on_term", ["0", "1"])
def test_term_is_forwarded_and_requeues_only_when_asked(cluster, requeue_on_term):
    proc = cluster.sbatch("--nodes=1", extra_env={"FAKE_TRAIN_MODE": "wait", "REQUEUE_ON_TERM": requeue_on_term},
                          background=True)
    result = _signal_batch_script(cluster, proc, signal.SIGTERM, 8)
    assert result.returncode == 75, result.stdout + cluster.job_log()
    assert all(r["signals"] == ["SIGTERM"] for r in cluster.ranks())
    assert cluster.requeues() == ([str(JOB_ID)] if requeue_on_term == "1" else [])


@pytest.mark.parametrize("code", [1, 3, 4])
def test_failure_is_not_requeued(cluster, code):
    result = cluster.sbatch("--nodes=2", extra_env={"FAKE_TRAIN_MODE": f"exit:{code}"})
    assert result.returncode == code
    assert cluster.requeues() == []
    assert f"training failed with exit code {code}: not requeuing" in cluster.job_log()


def test_requeue_cap(cluster):
    extra = {"FAKE_TRAIN_MODE": "exit:75", "FAKE_RESTART_COUNT": "3", "MAX_REQUEUES": "3"}
    result = cluster.sbatch("--nodes=1", extra_env=extra)
    assert result.returncode == 75
    assert cluster.requeues() == []
    assert "already requeued 3 times (MAX_REQUEUES=3)" in cluster.job_log()

    extra["FAKE_RESTART_COUNT"] = "2"  # one below the cap: still requeued
    assert cluster.sbatch("--nodes=1", extra_env=extra).returncode == 75
    assert cluster.requeues() == [str(JOB_ID)]


def test_refused_requeue_is_reported(cluster):
    result = cluster.sbatch("--nodes=1", extra_env={"FAKE_TRAIN_MODE": "exit:75", "FAKE_REQUEUE_RC": "1"})
    assert result.returncode == 75
    assert "scontrol requeue 4242 failed: resubmit with RUN_DIR" in cluster.job_log()


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("flags", "extra", "message"),
    [
        ((), {"CONFIG": "configs/missing.yaml"}, "CONFIG="),
        ((), {"CONTAINER_IMAGE": "/nonexistent/img.sqsh"}, "CONTAINER_IMAGE=/nonexistent/img.sqsh: no such file"),
        ((), {"DATA_DIR": "/nonexistent/data"}, "DATA_DIR=/nonexistent/data: no such directory"),
        ((), {"MAX_REQUEUES": "many"}, "MAX_REQUEUES must be a non-negative integer"),
        ((), {"REQUEUE_ON_TERM": "yes"}, "REQUEUE_ON_TERM must be 0 or 1"),
        (("--ntasks-per-node=4",), {}, "ask for one task per GPU (--ntasks-per-node=8)"),
        ((), {"OVERRIDES": "logging.run_dir=/elsewhere"}, "set RUN_DIR or CKPT_DIR instead"),
        ((), {"RUN_DIR": "/tmp/a:b"}, "pyxis mount paths may not contain ',' or ':'"),
        ((), {"DATA_DIR": "/tmp"}, None),  # control: a valid setting launches
    ],
)
def test_bad_settings_fail_with_one_line(cluster, flags, extra, message):
    result = cluster.sbatch("--nodes=1", *flags, extra_env=extra)
    if message is None:
        assert result.returncode == 0, cluster.job_log()
        return
    assert result.returncode == 2
    errors = [line for line in cluster.job_log().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], cluster.job_log()
    assert cluster.srun_calls() == []


def test_outside_a_job_and_outside_the_repo(cluster, tmp_path):
    env = dict(cluster.env)
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: not inside a SLURM job (SLURM_JOB_ID is unset): submit with sbatch slurm/pretrain_7b.sh"
    ]
    # a spooled copy submitted from a directory that is not the repository cannot find its helpers
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(SCRIPT, spool / "slurm_script")
    env.update(SLURM_JOB_ID="1", SLURM_SUBMIT_DIR=str(tmp_path))
    result = subprocess.run(["bash", str(spool / "slurm_script")], env=env, capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot find the repository" in result.stderr and "REPO_DIR" in result.stderr
    # REPO_DIR fixes it (the job then fails later for want of SLURM_NTASKS, with a clear message)
    env["REPO_DIR"] = str(REPO)
    result = subprocess.run(["bash", str(spool / "slurm_script")], env=env, capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: SLURM_NTASKS is unset: request one task per GPU with --ntasks-per-node"
    ]
