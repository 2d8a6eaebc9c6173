"""Helpers shared by the benchmark scripts (imported as a sibling: `python benchmarks/x.py` puts benchmarks/ on
sys.path): machine description, atomic JSON writes, device peaks, synthetic inputs, peak-memory probes."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# `python benchmarks/x.py` puts benchmarks/, not the checkout, on sys.path: without this an installed modeling_disa
# (e.g. another checkout's editable install) would be the code measured, not the one beside the script
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
PRESETS = REPO / "configuration" / "models"
RESULTS = REPO / "benchmarks" / "results"

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' datasheets, keyed by a substring of
# `torch.cuda.get_device_name()`; the longest matching key wins (the PCIe and NVL boards of a chip are slower).
BF16_PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H800 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 6000 Ada": 364e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "A6000": 155e12,
    "V100": None,  # no bf16 tensor cores
    "T4": None,
}


def bf16_peak_flops(device_name: str) -> tuple[float | None, str]:
    """(peak FLOP/s or None, note) for a CUDA device name."""
    key = max((key for key in BF16_PEAK_FLOPS if key in device_name), key=len, default=None)
    if key is None:
        return None, f"unknown device {device_name!r}: add its dense bf16 peak to BF16_PEAK_FLOPS for an MFU"
    peak = BF16_PEAK_FLOPS[key]
    if peak is None:
        return None, f"{device_name} ({key}) has no bf16 tensor-core peak: MFU not defined"
    return peak, f"dense bf16 peak of {key} from the vendor datasheet"


def machine_info(device: torch.device | str = "cpu") -> dict:
    """Platform, versions, CPU model, threads, load and (on CUDA) the GPU."""
    device = torch.device(device)
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    import transformers

    info["transformers"] = transformers.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            capability=f"{props.major}.{props.minor}",
        )
    else:
        info["device_name"] = info["cpu"]
    return info


def write_json(path: Path | str, data) -> None:
    """Write `data` as JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_config(preset: str | Path):
    """DiSaConfig of a preset folder (a name under configuration/models/ or a path)."""
    from modeling_disa import DiSaConfig

    folder = Path(preset)
    if not folder.is_dir():
        folder = PRESETS / str(preset)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no preset config at {folder}/config.json; pass a folder under {PRESETS}.")
    return DiSaConfig.from_pretrained(folder)


def load_model(preset: str | Path, device: torch.device | str = "cpu", train: bool = False):
    """Random-weight model of a preset (see `load_config`); no download."""
    from modeling_disa import DiSaForOpenVocabSegmentation

    config = load_config(preset)
    torch.manual_seed(0)
    model = DiSaForOpenVocabSegmentation(config).to(device)
    return model.train(train)


def random_text_embeds(config, num_classes: int, device, seed: int = 0) -> torch.Tensor:
    """(T, P, C) L2-normalised stand-ins for `model.get_text_embeddings` (the cost depends on the values only
    through the number of tokens SDM marks foreground)."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(num_classes, config.num_prompts, config.projection_dim, generator=g)
    return torch.nn.functional.normalize(embeds, dim=-1).to(device)


def prompt_tokens(config, num_classes: int, length: int, device, seed: int = 0) -> dict:
    """Synthetic prompt tokens (T*P, L) of a realistic length: BOS, random ids, EOS at the end (the pooled position
    for argmax- and eos-id pooling alike)."""
    vocab = config.text_config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab - 2, (num_classes * config.num_prompts, length), generator=g)
    ids[:, 0] = vocab - 2
    ids[:, -1] = vocab - 1
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def peak_rss_mib() -> float:
    """High-water resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
