"""Machine and version lines for benchmark sections (bench scripts import this from their own folder)."""

from __future__ import annotations

import os
import platform
from importlib.metadata import version
from pathlib import Path
from typing import Sequence

import torch


def machine_line(details: str = "") -> str:
    """CPU model, visible cores, RAM, GPU (when CUDA is present), `details`, and the load average now: the load
    shows whether other jobs shared the machine while the benchmark ran."""
    cpu, ram = platform.processor() or platform.machine(), "RAM unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
        mem_kb = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        ram = f"{mem_kb / 1024**2:.1f} GiB RAM"
    except (OSError, StopIteration):
        pass
    parts = [cpu, f"{os.cpu_count()} cores visible", ram]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    if details:
        parts.append(details)
    parts.append("load average %.2f, %.2f, %.2f" % os.getloadavg())
    return ", ".join(parts)


def versions_line(packages: Sequence[str] = ("torch", "transformers", "peft", "accelerate")) -> str:
    return f"Python {platform.python_version()}, " + ", ".join(f"{p} {version(p)}" for p in packages)
