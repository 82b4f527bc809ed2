"""One of two gloo processes saving checkpoints under injected faults (tests/train/test_checkpoint.py).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=P python tests/checkpoint_worker.py ROOT CASE

CASE: "space" (the free-space check fails on rank 1 only), "publish" (the main process cannot publish),
"different" (the processes chose different checkpoints to resume). Prints one line: "raised: <message>" or "ok".
"""

from __future__ import annotations

import os
import shutil
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train.checkpoint as checkpoint  # noqa: E402
from train.errors import CheckpointError  # noqa: E402


def main() -> None:
    root, case = Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ["RANK"])
    # A short timeout: a process left waiting for the other fails the test instead of hanging it.
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    accelerator = SimpleNamespace(is_main_process=rank == 0, num_processes=2, process_index=rank, device="cpu",
                                  wait_for_everyone=dist.barrier)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())

    def save(step: int) -> None:
        checkpoint.save_checkpoint(root, step, accelerator, model, optimizer, {"step": step},
                                   lambda d: (d / f"w{rank}.bin").write_bytes(b"w" * 4096), keep=3)

    try:
        if case == "space":
            save(1)
            if rank == 1:  # only this process's view of the disk is full
                shutil.disk_usage = lambda path: SimpleNamespace(total=10, used=10, free=0)
            save(2)
        elif case == "publish":
            if rank == 0:
                checkpoint.write_manifest = lambda d: (_ for _ in ()).throw(OSError(28, "No space left on device"))
            save(1)
        elif case == "different":
            save(1)
            save(2)
            chosen = root / ("checkpoint-2" if rank == 0 else "checkpoint-1")
            checkpoint.check_same_checkpoint(accelerator, chosen)
        print("ok", flush=True)
    except CheckpointError as e:
        print(f"raised: {e}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
