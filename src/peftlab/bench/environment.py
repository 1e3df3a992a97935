"""`python -m peftlab.bench.environment`: the accelerator, Python and the versions of the packages the bench and
the GPU checks import, one per line; exits 1 when CUDA or one of the required packages is missing (so that
scripts/gpu_check.sh says why before its other parts fail one by one)."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import sys
from pathlib import Path

REQUIRED = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "deepspeed", "hydra-core", "datasets",
            "pytest")
OPTIONAL = ("liger-kernel", "flash-attn")  # TRL's Liger setting; flash_attention_2


def versions(names) -> dict[str, str | None]:
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine_facts(device: str) -> dict:
    """What the scale suite ran on, read when it runs (its report may be rendered elsewhere, from scale.json)."""
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor() or platform.machine())
    ram = next((int(l.split()[1]) / 2**20 for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram, "device": device,
            "versions": versions(("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate"))}


def main() -> int:
    import torch

    cuda = torch.cuda.is_available()
    device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if cuda else "no CUDA device"
    print(f"device: {device}; Python {platform.python_version()} at {sys.executable}")
    required, optional = versions(REQUIRED), versions(OPTIONAL)
    for name, version in {**required, **optional}.items():
        print(f"{name}: {version or 'not installed'}")
    missing = [name for name, version in required.items() if version is None]
    if missing:
        print(f"missing: {', '.join(missing)}")
    return 0 if cuda and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
