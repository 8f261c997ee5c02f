"""Rank discovery (training/distributed.py): torchrun's variables first, then SLURM's, else one process."""

from __future__ import annotations

from hybrid_megatron.training.distributed import Ranks, discover_ranks


def test_torchrun_variables_win():
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert discover_ranks(env) == Ranks(5, 16, 5)


def test_slurm_tasks_one_per_gpu():
    env = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3"}
    assert discover_ranks(env) == Ranks(11, 16, 3)


def test_a_plain_process_is_a_world_of_one():
    assert discover_ranks({}) == Ranks(0, 1, 0)
    assert discover_ranks({"SLURM_PROCID": "0"}) == Ranks(0, 1, 0)  # no task count: not an srun step
