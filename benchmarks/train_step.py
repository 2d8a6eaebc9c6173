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
(the CPU sdpa kernel is not counted by it); MFU = FLOPs per step / step time / the device's dense peak for the dtype
(table below; null when the device is unknown or a CPU). Results go to benchmarks/results/<name>.json with the
machine and device description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _training_module(name: str):
    """A module of training/ (a folder of scripts, not an installed package), loaded by file path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, "training", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Dense tensor-core peaks (FLOP/s), from the vendors' datasheets (SXM parts; no sparsity).
PEAK_FLOPS = {
    "H100": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12},  # fp32 = TF32 tensor cores
    "H200": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
}


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="configuration/models/disa-tiny")
    p.add_argument("--resolution", type=int, default=128, help="crop size fed to the model")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--num_classes", type=int, default=16)
    p.add_argument("--prompt_length", type=int, default=12, help="tokens per prompt incl. BOS/EOS (COCO: ~10-13)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--name", default=None, help="result file name (default from the settings)")
    p.add_argument("--output_dir", default=os.path.join(REPO_ROOT, "benchmarks", "results"))
    return p.parse_args()


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def peak_for(device_name: str, dtype: str):
    for key, table in PEAK_FLOPS.items():
        if key in device_name:
            return table[dtype]
    return None


def main():
    a = parse()
    from modeling_disa import DiSaConfig, DiSaForOpenVocabSegmentation

    device = torch.device(a.device)
    preset = a.preset if os.path.isabs(a.preset) else os.path.join(REPO_ROOT, a.preset)
    torch.manual_seed(0)
    config = DiSaConfig.from_pretrained(preset)
    model = DiSaForOpenVocabSegmentation(config).to(device).train()
    if a.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    groups = _training_module("optimization").optimizer_param_groups(model, 2e-4, 0.01, 1e-4)
    optimizer = torch.optim.AdamW(groups, lr=2e-4)
    trainable = [p for p in model.parameters() if p.requires_grad]

    B, S, T, L = a.batch_size, a.resolution, a.num_classes, a.prompt_length
    tc = config.text_config
    vocab = tc.vocab_size
    pixel_values = torch.randn(B, 3, S, S, device=device)
    labels = torch.randint(0, T, (B, S, S), device=device)
    labels[:, : S // 8] = config.ignore_index
    eos = vocab - 1
    input_ids = torch.randint(1, vocab - 2, (T, L), device=device)
    input_ids[:, 0] = vocab - 2  # BOS
    input_ids[:, -1] = eos  # EOS at the end: the pooled position for argmax- and eos-id pooling alike
    attention_mask = torch.ones_like(input_ids)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.dtype)

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                         labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.01)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    for _ in range(a.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(a.steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    result = {
        "what": "DiSa training step (forward+BCE, backward, grad clip, AdamW) on synthetic data",
        "preset": os.path.relpath(preset, REPO_ROOT),
        "resolution": S, "batch_size": B, "num_classes": T, "prompt_length": L, "dtype": a.dtype,
        "gradient_checkpointing": a.gradient_checkpointing,
        "device": str(device), "steps_timed": a.steps, "warmup_steps": a.warmup,
        "step_time_s_median": statistics.median(times), "step_time_s_min": min(times),
        "step_time_s_all": times, "final_loss": float(loss.detach()),
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "machine": machine_info(device),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["peak_rss_mib"] = peak
        result["peak_rss_mib_before_steps"] = rss_before

    if not a.no_flops:
        from torch.utils.flop_counter import FlopCounterMode

        counted_with = "eager"
        try:
            model.set_attn_implementation("eager")
        except Exception:  # noqa: BLE001 - sdpa attention then escapes the count
            counted_with = "sdpa (attention matmuls not counted: lower bound)"
        counter = FlopCounterMode(display=False)
        with counter:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                             labels=labels).loss
            loss.backward()
        optimizer.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
        result["flops_per_step"] = flops
        result["flops_counted_with"] = counted_with
        result["achieved_tflops"] = flops / result["step_time_s_median"] / 1e12
        peak = peak_for(result["machine"].get("gpu", ""), a.dtype) if device.type == "cuda" else None
        result["peak_tflops"] = peak / 1e12 if peak else None
        result["mfu"] = flops / result["step_time_s_median"] / peak if peak else None

    os.makedirs(a.output_dir, exist_ok=True)
    name = a.name or (f"train_step_{os.path.basename(preset)}_{S}px_b{B}_t{T}_{a.dtype}_"
                      f"{result['machine'].get('gpu', 'cpu').replace(' ', '_')}")
    path = os.path.join(a.output_dir, f"{name}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    summary = {k: result.get(k) for k in ("step_time_s_median", "peak_memory_gib", "peak_rss_mib",
                                           "flops_per_step", "achieved_tflops", "mfu")}
    print(json.dumps(summary, indent=1))
    print("written", path)


if __name__ == "__main__":
    main()
