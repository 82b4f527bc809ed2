"""Helpers shared by several test modules (importable as `helpers`: pytest puts tests/ on sys.path)."""

import shutil
import socket
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The multi-process backends, as accelerate launch flags; DeepSpeed runs on the CPU with DS_ACCELERATOR=cpu.
BACKENDS = {
    "ddp": ["--multi_gpu", "--mixed_precision", "no"],
    "zero2": ["--use_deepspeed", "--zero_stage", "2", "--mixed_precision", "no"],
    "zero2-bf16": ["--use_deepspeed", "--zero_stage", "2", "--mixed_precision", "bf16"],
    "zero3": ["--use_deepspeed", "--zero_stage", "3", "--mixed_precision", "no"],
}


def launcher(backend: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no",
            *BACKENDS[backend], "--num_processes", str(processes), "--main_process_port", str(free_port())]


def copy_checkpoint(run: Path, stage: str, step: int, into: Path) -> None:
    """Start `into` from `run`'s checkpoint of `step`, as if a run there had been killed right after writing it."""
    target = into / stage / "checkpoints" / f"checkpoint-{step}"
    shutil.copytree(run / stage / "checkpoints" / f"checkpoint-{step}", target)
