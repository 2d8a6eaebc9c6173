"""CPU threads per training process: a single-process run uses every core it may run on, N processes split them.

`accelerate launch` without `--cpu` (its default on a machine without a GPU, e.g. README's main command) exports
`OMP_NUM_THREADS=1` to the script, so torch would compute on one core of a multi-core machine. The child process
cannot tell that value from a user's choice by looking at its own environment, so the launcher process is asked:
its command line holds `--num_cpu_threads_per_process` and its own environment holds `OMP_NUM_THREADS` only when the
user set them. A value the user chose (at the launcher, or directly when the script runs without `accelerate
launch`) is kept; so is any value when the launcher cannot be inspected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# the variables torchrun / MPI set to the number of processes on this machine (the ones accelerate reads too)
LOCAL_SIZE_VARIABLES = (
    "LOCAL_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MV2_COMM_WORLD_LOCAL_SIZE",
)
# exported by every `accelerate launch` path (single process and torchrun), by nothing else
ACCELERATE_LAUNCH_MARKER = "ACCELERATE_DYNAMO_BACKEND"
THREADS_FLAG = "--num_cpu_threads_per_process"


@dataclass(frozen=True)
class Launcher:
    """The `accelerate launch` process as the operating system started it."""

    cmdline: list[str]
    environ: dict[str, str]


@dataclass(frozen=True)
class ThreadPlan:
    threads: int | None  # None: keep torch's current setting
    reason: str

    def as_dict(self, applied: int) -> dict:
        return {"torch_threads": applied, "set_by_train_py": self.threads is not None, "reason": self.reason}


def local_process_count(env: dict[str, str]) -> int:
    for name in LOCAL_SIZE_VARIABLES:
        if env.get(name):
            return max(int(env[name]), 1)
    return 1


def is_accelerate_launcher(cmdline: list[str]) -> bool:
    """`accelerate launch ...`, `accelerate-launch ...` or `python -m accelerate.commands.launch ...`."""
    names = [os.path.basename(a) for a in cmdline]
    for i, name in enumerate(names):
        if name == "accelerate" and i + 1 < len(names) and names[i + 1] == "launch":
            return True
        if name in ("accelerate-launch", "accelerate.commands.launch", "accelerate.commands.accelerate_cli"):
            return True
    return False


def user_chose_threads(launcher: Launcher) -> bool:
    flag = any(a == THREADS_FLAG or a.startswith(THREADS_FLAG + "=") for a in launcher.cmdline)
    return flag or "OMP_NUM_THREADS" in launcher.environ


def plan_cpu_threads(env: dict[str, str], available_cpus: int, launcher: Launcher | None) -> ThreadPlan:
    """Threads for this process: `available_cpus` (the cores it may run on) split over the processes of this machine,
    unless OMP_NUM_THREADS is the user's choice (see the module docstring)."""
    local = local_process_count(env)
    share = max(available_cpus // local, 1)
    split = f"{available_cpus} cores / {local} process(es) on this machine"
    if "OMP_NUM_THREADS" not in env:
        return ThreadPlan(share, f"OMP_NUM_THREADS unset: {split}")
    given = env["OMP_NUM_THREADS"]
    if ACCELERATE_LAUNCH_MARKER not in env:
        return ThreadPlan(None, f"OMP_NUM_THREADS={given} set by the user")
    if launcher is None:
        return ThreadPlan(None, f"OMP_NUM_THREADS={given} from accelerate launch, whose process could not be read")
    if user_chose_threads(launcher):
        return ThreadPlan(None, f"OMP_NUM_THREADS={given} chosen at accelerate launch")
    return ThreadPlan(share, f"accelerate launch's default OMP_NUM_THREADS={given} replaced: {split}")


def find_accelerate_launcher(max_depth: int = 4) -> Launcher | None:
    """The nearest ancestor process that is `accelerate launch` (torchrun workers are its grandchildren)."""
    import psutil  # an accelerate dependency

    try:
        process = psutil.Process().parent()
        for _ in range(max_depth):
            if process is None:
                return None
            cmdline = process.cmdline()
            if is_accelerate_launcher(cmdline):
                return Launcher(cmdline=cmdline, environ=process.environ())
            process = process.parent()
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return None  # the plan then keeps the launcher's value
    return None


def available_cores() -> int:
    """Physical cores among the CPUs this process may run on: hyper-threads share a core's arithmetic units, so
    compute-bound torch threads gain nothing from them (torch's and accelerate's defaults count physical cores too)."""
    import psutil

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    logical, physical = psutil.cpu_count(logical=True), psutil.cpu_count(logical=False)
    if not logical or not physical:
        return allowed
    return max(allowed * physical // logical, 1)


def apply_cpu_threads() -> dict:
    """Set torch's intra-op threads from `plan_cpu_threads`; returns what was decided, for the run's report."""
    import torch

    env = dict(os.environ)
    launcher = find_accelerate_launcher() if ACCELERATE_LAUNCH_MARKER in env and "OMP_NUM_THREADS" in env else None
    plan = plan_cpu_threads(env, available_cores(), launcher)
    if plan.threads is not None:
        torch.set_num_threads(plan.threads)
    return plan.as_dict(torch.get_num_threads())
