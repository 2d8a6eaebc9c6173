#!/usr/bin/env python
"""Training-step time, peak memory and MFU of DiSa (figure script, not a test).

One "step" is what training/train.py does per optimiser step: forward with labels (BCE loss) on a batch of crops and
T class prompts (the text encoder runs and is fine-tuned every step), backward, full-model gradient clipping, AdamW
with the recipe's two learning-rate groups. Inputs are synthetic (random pixels, labels and prompt tokens of a
realistic length), weights random (no download): time and memory do not depend on the values.

    # CPU, tiny preset (what the CPU machines run)
    python benchmarks/train_step.py --preset configuration/models/disa-tiny --resolution 128 --batch_size 2 \
        --num_classes 16 --dtype fp32
    # GPU, the CAT-Seg ViT-B setting: 384 crops, batch 4, 171 COCO-Stuff classes, bf16 autocast
    python benchmarks/train_step.py --preset configuration/models/disa-vit-b-16 --resolution 384 --batch_size 4 \
        --num_classes 171 --dtype bf16 --device cuda

FLOPs per step come from `torch.utils.flop_counter.FlopCounterMode` over one forward+backward with eager attention
(the CPU sdpa kernel is not counted by it); MFU = FLOPs per step / step time / the device's dense bf16 peak
(`bench_common.BF16_PEAK_FLOPS`; null for other dtypes, CPUs and unknown devices, with a note). Results go to
benchmarks/results/<name>.json with the machine and device description.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_common import (  # noqa: E402
    REPO,
    RESULTS,
    bf16_peak_flops,
    load_model,
    machine_info,
    peak_rss_mib,
    prompt_tokens,
    write_json,
)

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def _training_module(name: str):
    """A module of training/ (a folder of scripts, not an installed package), loaded by file path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="configuration/models/disa-tiny")
    p.add_argument("--resolution", type=int, default=128, help="crop size fed to the model")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--num_classes", type=int, default=16)
    p.add_argument("--prompt_length", type=int, default=12, help="tokens per prompt incl. BOS/EOS (COCO: ~10-13)")
    p.add_argument("--dtype", choices=sorted(AMP), default="fp32", help="autocast dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU); default: torch's")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--name", default=None, help="result file name (default from the settings)")
    p.add_argument("--output_dir", default=str(RESULTS))
    return p.parse_args(argv)


def enable_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def measure_train_step(
    preset,
    *,
    resolution,
    batch_size,
    num_classes,
    prompt_length=12,
    dtype="fp32",
    device="cpu",
    steps=10,
    warmup=3,
    gradient_checkpointing=False,
    count_flops=True,
) -> dict:
    """Time `steps` training steps after `warmup` ones; peak memory, FLOPs per step and MFU. Returns the result."""
    device = torch.device(device)
    model = load_model(preset, device, train=True)
    config = model.config
    if gradient_checkpointing:
        enable_checkpointing(model)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    groups = _training_module("optimization").optimizer_param_groups(model, 2e-4, 0.01, 1e-4)
    optimizer = torch.optim.AdamW(groups, lr=2e-4)
    trainable = [p for p in model.parameters() if p.requires_grad]

    B, S, T = batch_size, resolution, num_classes
    g = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(B, 3, S, S, generator=g).to(device)
    labels = torch.randint(0, T, (B, S, S), generator=g)
    labels[:, : S // 8] = config.ignore_index
    labels = labels.to(device)
    tokens = prompt_tokens(config, T, prompt_length, device)
    amp = AMP[dtype]

    def forward_backward():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = model(pixel_values=pixel_values, labels=labels, **tokens).loss
        loss.backward()
        return loss

    def step():
        loss = forward_backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.01)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rss_before = peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    result = {
        "what": "DiSa training step (forward+BCE, backward, grad clip, AdamW) on synthetic data",
        "preset": os.path.relpath(str(preset), REPO) if os.path.isabs(str(preset)) else str(preset),
        "mode": "DiSa" if (config.use_sdm or config.use_hrm) else "CAT-Seg",
        "resolution": S,
        "batch_size": B,
        "num_classes": T,
        "prompt_length": prompt_length,
        "dtype": dtype,
        "gradient_checkpointing": gradient_checkpointing,
        "device": str(device),
        "steps_timed": steps,
        "warmup_steps": warmup,
        "step_time_s_median": statistics.median(times),
        "step_time_s_min": min(times),
        "step_time_s_all": times,
        "final_loss": float(loss.detach()),
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "machine": machine_info(device),
    }
    if device.type == "cuda":
        # warm-up steps included: AdamW allocates its state on the first step
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        result["memory_method"] = "torch.cuda.max_memory_allocated over warm-up and timed steps"
    else:
        result["peak_rss_mib"] = peak_rss_mib()
        result["peak_rss_mib_before_steps"] = rss_before
        result["memory_method"] = "peak RSS of the process (resource.getrusage ru_maxrss), weights included"

    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counted_with = "eager"
        try:
            model.set_attn_implementation("eager")
        except Exception:  # noqa: BLE001 - sdpa attention then escapes the count
            counted_with = "sdpa (attention matmuls not counted: lower bound)"
        counter = FlopCounterMode(display=False)
        with counter:
            forward_backward()
        optimizer.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
        result["flops_per_step"] = flops
        result["flops_counted_with"] = counted_with
        result["achieved_tflops"] = flops / result["step_time_s_median"] / 1e12
        if device.type == "cuda" and dtype == "bf16":
            peak, note = bf16_peak_flops(result["machine"]["device_name"])
        else:
            peak, note = None, f"MFU is given against the bf16 peak of a CUDA device; this run is {dtype} on {device}"
        result["peak_tflops"] = peak / 1e12 if peak else None
        result["mfu"] = flops / result["step_time_s_median"] / peak if peak else None
        result["mfu_note"] = note
    return result


def main(argv=None):
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    preset = a.preset if os.path.isabs(a.preset) else os.path.join(REPO, a.preset)
    result = measure_train_step(
        preset,
        resolution=a.resolution,
        batch_size=a.batch_size,
        num_classes=a.num_classes,
        prompt_length=a.prompt_length,
        dtype=a.dtype,
        device=a.device,
        steps=a.steps,
        warmup=a.warmup,
        gradient_checkpointing=a.gradient_checkpointing,
        count_flops=not a.no_flops,
    )
    tag = "cpu" if a.device == "cpu" else result["machine"]["device_name"].replace(" ", "_")
    settings = f"{a.resolution}px_b{a.batch_size}_t{a.num_classes}_{a.dtype}"
    name = a.name or f"train_step_{os.path.basename(preset)}_{settings}_{tag}"
    path = os.path.join(a.output_dir, f"{name}.json")
    write_json(path, result)
    summary = {
        k: result.get(k)
        for k in (
            "mode",
            "trainable_params",
            "step_time_s_median",
            "peak_memory_gib",
            "peak_rss_mib",
            "flops_per_step",
            "achieved_tflops",
            "mfu",
        )
    }
    print(json.dumps(summary, indent=1))
    print("written", path)


if __name__ == "__main__":
    main()
