"""Inference options that trade exactness for speed, and the checks that refuse the ones a machine cannot run fast.

- `dtype` (transformers' name: `from_pretrained(..., dtype=)`, `pipeline(..., dtype=)`): `torch.bfloat16` or
  `torch.float16` weights and activations. On a CPU it is accepted only when the CPU has instructions for that type:
  bfloat16 needs AVX512_BF16 or AMX_BF16 (x86) or the BF16 extension (Arm); float16 needs AVX512_FP16 or AMX_FP16
  (x86) or half-precision arithmetic (Arm). Without them PyTorch converts every operand to float32 and back, which
  is slower than float32 itself, so such a request is refused rather than run slowly.
- `torch_compile`, `torch_compile_backend`, `torch_compile_mode` (`transformers.TrainingArguments`' names and rule:
  setting the backend or the mode turns compilation on): `torch.compile` of the model's forward. With the default
  backend ("inductor") the numbers change in the last bits (fused kernels reorder sums); the "eager" backend only
  traces, and gives the uncompiled numbers exactly.

Hub-shipped module: torch only.
"""

from __future__ import annotations

import functools

import torch

DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# /proc/cpuinfo flags of native arithmetic in each reduced type (x86 "flags" line, Arm "Features" line)
CPU_DTYPE_FLAGS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16", "fphp"),
}


def resolve_dtype(dtype) -> torch.dtype:
    """A `torch.dtype` from a dtype or one of `DTYPE_NAMES` ("bfloat16", "bf16", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.removeprefix("torch.")]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_NAMES)} or a torch.dtype.")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), None where there is no such file."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.split(":")[0].strip() in ("flags", "Features"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return frozenset()


def cpu_supports_dtype(dtype) -> bool:
    """Whether this CPU computes in `dtype` natively (float32 and float64 always)."""
    dtype = resolve_dtype(dtype)
    if dtype not in CPU_DTYPE_FLAGS:
        return True
    flags = cpu_flags()
    if flags is None:  # not Linux: ask oneDNN, which PyTorch's reduced-precision CPU kernels use
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return any(flag in flags for flag in CPU_DTYPE_FLAGS[dtype])


def check_inference_dtype(dtype, device) -> torch.dtype:
    """`dtype` as a `torch.dtype`; raises `ValueError` for a reduced type on a CPU without instructions for it."""
    dtype = resolve_dtype(dtype)
    if torch.device(device).type == "cpu" and not cpu_supports_dtype(dtype):
        wanted = " or ".join(flag.upper() for flag in CPU_DTYPE_FLAGS[dtype])
        raise ValueError(
            f"dtype {dtype} on this CPU ({torch.backends.cpu.get_cpu_capability()}, no {wanted}): PyTorch would "
            f"emulate {dtype} through float32, slower than float32 itself. Use dtype=torch.float32 here (optionally "
            "torch_compile=True), or run on a CPU or GPU with native support."
        )
    return dtype


def compile_settings(torch_compile: bool = False, backend: str | None = None, mode: str | None = None) -> dict | None:
    """`torch.compile` keyword arguments, or None for no compilation; a backend or a mode turns compilation on
    (`TrainingArguments`' rule)."""
    if not (torch_compile or backend or mode):
        return None
    settings = {"backend": backend or "inductor"}
    if mode:
        settings["mode"] = mode
    return settings


def compile_for_inference(module, torch_compile: bool = False, backend: str | None = None, mode: str | None = None):
    """`module` itself, or `torch.compile(module, ...)` (attributes such as `get_text_embeddings` and `config` still
    reach the module); the module is not changed."""
    settings = compile_settings(torch_compile, backend, mode)
    return module if settings is None else torch.compile(module, **settings)


__all__ = [
    "DTYPE_NAMES",
    "check_inference_dtype",
    "compile_for_inference",
    "compile_settings",
    "cpu_supports_dtype",
    "resolve_dtype",
]
