"""Crash-atomic checkpoints of a training run: `save_state` into a hidden folder, one rename publishes it.

accelerate's own rotation (`ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=K)`) writes
`save_state` straight into the final `checkpoint_<i>` folder and deletes the oldest checkpoint *before* writing the
new one; a crash mid-save then leaves a half-written folder under the final name and one complete checkpoint fewer.
It also counts every entry of the folder as a checkpoint. So the publish step is kept here: the new checkpoint is
complete before it appears, old ones are removed only after it appeared.

The loop state (`TrainingProgress`) travels with `save_state` / `load_state` through accelerate's state hooks, as
JSON. `Accelerator.register_for_checkpointing` would pickle it and load it back with `torch.load(weights_only=False)`
(accelerate's `load_custom_state` forces that), which this project does not do with files it reads.

Test-only hook: the environment variable `DISA_TRAIN_FAULT=kill_after_step:N` (SIGKILL right after optimiser step N
and its checkpoint) or `kill_during_save:N` (SIGKILL after `save_state` of step N wrote its files, before the
checkpoint is published) simulates a crash; `tests/test_train_script.py` uses it to prove resume bit-identity and
checkpoint atomicity.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys

CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
STATE_FILE = "training_state.json"


@dataclasses.dataclass
class TrainingProgress:
    """Where the loop stands: saved in every checkpoint (`STATE_FILE`, which also marks it complete)."""

    completed_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_samples: int = 0
    seen_samples: int = 0
    num_processes: int = 1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    # the split guard's warnings so far (train.py, models with SDM), so that a resumed run's count goes on
    split_guard_warnings: int = 0
    split_guard_last_warning: dict | None = None

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def register_progress(accelerator, progress: TrainingProgress) -> None:
    """Save `progress` with every `accelerator.save_state` and restore it in `accelerator.load_state`."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            _write_json(os.path.join(output_dir, STATE_FILE), progress.state_dict())

    def load_hook(models, input_dir):
        with open(os.path.join(input_dir, STATE_FILE), encoding="utf-8") as handle:
            progress.load_state_dict(json.load(handle))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints (published by rename, so they hold `STATE_FILE`), oldest first."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        step = name[len(CHECKPOINT_PREFIX) :]
        if name.startswith(CHECKPOINT_PREFIX) and step.isdigit() and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def check_output_dir(output_dir: str, resume_from_checkpoint: str | None, overwrite_output_dir: bool) -> None:
    """Refuse an output_dir that holds another run, unless resuming or overwriting. Runs on every process before
    anyone writes, so all processes take the same decision."""
    holds_files = os.path.isdir(output_dir) and bool(os.listdir(output_dir))
    if holds_files and not resume_from_checkpoint and not overwrite_output_dir:
        raise SystemExit(
            f"output_dir {output_dir!r} is not empty ({sorted(os.listdir(output_dir))[:6]}...): it holds another run. "
            "Use --resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, "
            "or another --output_dir."
        )


def prepare_output_dir(output_dir: str, resume_from_checkpoint: str | None, overwrite_output_dir: bool) -> None:
    """Main process only: with overwrite_output_dir, drop the other run's checkpoints; drop the leftovers of
    checkpoints that a crash interrupted (they were never published)."""
    root = checkpoint_root(output_dir)
    if overwrite_output_dir and not resume_from_checkpoint and os.path.isdir(root):
        shutil.rmtree(root)
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def resolve_resume(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """'latest' -> the newest complete checkpoint (None when there is none yet); a folder -> itself, if complete."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume_from_checkpoint, STATE_FILE)):
        raise SystemExit(f"{resume_from_checkpoint!r} is not a complete checkpoint (no {STATE_FILE})")
    return resume_from_checkpoint


def fault(kind: str, step: int) -> None:
    """SIGKILL this process when `DISA_TRAIN_FAULT` is `kind:step` (tests only)."""
    if os.environ.get("DISA_TRAIN_FAULT", "") == f"{kind}:{step}":
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # directories cannot be opened for fsync on some filesystems
        pass


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int) -> str:
    """`save_state` into a hidden temporary folder, then publish it with one atomic rename and prune to the last
    `total_limit` (0 keeps all). A crash at any point leaves either the old set or the new one."""
    root = checkpoint_root(output_dir)
    tmp = os.path.join(root, f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{step}")
    final = os.path.join(root, f"{CHECKPOINT_PREFIX}{step}")
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    fault("kill_during_save", step)
    if accelerator.is_main_process:
        _fsync_dir(tmp)
        if os.path.exists(final):  # re-saving the same step after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if total_limit > 0:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
