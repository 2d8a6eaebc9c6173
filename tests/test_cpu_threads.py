"""training/train.py's torch CPU threads: `accelerate launch`'s default of one thread (OMP_NUM_THREADS=1 exported
without `--cpu`) is replaced by the CPUs the process may run on, split over the processes of the machine; a thread
count the user chose is kept. No timing: the tests read the thread count torch reports."""

import os
import subprocess
import sys

import pytest

from cpu_threads import Launcher, is_accelerate_launcher, plan_cpu_threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RECIPE = os.path.join(REPO, "configuration", "training", "tiny_test.yaml")
LAUNCHED = {"ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_MIXED_PRECISION": "no"}
LAUNCH = ["/venv/bin/python3", "/venv/bin/accelerate", "launch", "training/train.py"]


def test_unset_threads_use_every_cpu_and_processes_split_them():
    assert plan_cpu_threads({}, 8, None).threads == 8
    assert plan_cpu_threads({"LOCAL_WORLD_SIZE": "2"}, 8, None).threads == 4
    assert plan_cpu_threads({"LOCAL_WORLD_SIZE": "3"}, 8, None).threads == 2  # floor: never oversubscribe
    assert plan_cpu_threads({"LOCAL_WORLD_SIZE": "4"}, 2, None).threads == 1  # at least one


def test_accelerate_default_is_replaced():
    env = {**LAUNCHED, "OMP_NUM_THREADS": "1"}
    assert plan_cpu_threads(env, 2, Launcher(LAUNCH, {"PATH": "/bin"})).threads == 2
    env2 = {**env, "LOCAL_WORLD_SIZE": "2"}
    assert plan_cpu_threads(env2, 16, Launcher(LAUNCH[:3] + ["--cpu", "--num_processes", "2"], {})).threads == 8


@pytest.mark.parametrize(
    "launcher",
    [
        Launcher(LAUNCH, {"OMP_NUM_THREADS": "1"}),  # OMP_NUM_THREADS=1 accelerate launch ...
        Launcher(LAUNCH[:3] + ["--num_cpu_threads_per_process", "1", "train.py"], {}),
        Launcher(LAUNCH[:3] + ["--num_cpu_threads_per_process=1", "train.py"], {}),
    ],
)
def test_thread_count_chosen_at_the_launcher_is_kept(launcher):
    plan = plan_cpu_threads({**LAUNCHED, "OMP_NUM_THREADS": "1"}, 8, launcher)
    assert plan.threads is None and "chosen" in plan.reason


def test_omp_num_threads_without_accelerate_or_unreadable_launcher_is_kept():
    assert plan_cpu_threads({"OMP_NUM_THREADS": "1"}, 8, None).threads is None
    assert plan_cpu_threads({**LAUNCHED, "OMP_NUM_THREADS": "1"}, 8, None).threads is None


def test_accelerate_launcher_is_recognised():
    assert is_accelerate_launcher(LAUNCH)
    assert is_accelerate_launcher(["python", "-m", "accelerate.commands.launch", "x.py"])
    assert not is_accelerate_launcher(["python", "-m", "torch.distributed.run", "x.py"])
    assert not is_accelerate_launcher(["/venv/bin/accelerate", "config"])


PROBE = """
import sys, torch
sys.path.insert(0, {training!r})
import train
try:  # main sets the threads first, then refuses these settings: no training runs
    train.main(["--config", {recipe!r}, "--output_dir", {out!r}, "--toy_world", "{{seed: 1}}"])
except SystemExit:
    pass
print("THREADS", torch.get_num_threads())
"""


def launched_threads(tmp_path, launcher_env: dict, launch_args=()) -> int:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(training=os.path.join(REPO, "training"), recipe=TINY_RECIPE, out=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(launcher_env, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", *launch_args, str(probe)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split("THREADS")[-1].split()[0])


def test_train_py_under_accelerate_launch_uses_the_cores_it_has(tmp_path):
    import psutil

    # the physical cores among the CPUs this process may use (hyper-threads share a core)
    cores = len(os.sched_getaffinity(0)) * psutil.cpu_count(logical=False) // psutil.cpu_count(logical=True)
    assert launched_threads(tmp_path, {}) == max(cores, 1)


def test_train_py_keeps_the_users_omp_num_threads(tmp_path):
    assert launched_threads(tmp_path, {}, ["--num_cpu_threads_per_process", "1"]) == 1
