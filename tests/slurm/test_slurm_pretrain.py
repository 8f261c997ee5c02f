"""slurm/pretrain_7b.sh on a fake cluster (tests/slurm/fake_cluster.py): static checks, the launch command and
rank environment, and bad settings."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.slurm.fake_cluster import JOB_ID, REPO, SCRIPT, split_srun
from tests.tool_helpers import dev_tool


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
    opts, task_cmd = split_srun(calls[0])
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
    opts, task_cmd = split_srun(cluster.srun_calls()[0])
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
