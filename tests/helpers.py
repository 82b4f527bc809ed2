"""Helpers shared by several test modules (importable as `helpers`: pytest puts tests/ on sys.path)."""

import json
import shutil
import socket
import struct
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


def logged_numbers(record: dict) -> dict:
    """The values of a log.jsonl record that the trackers get: its numbers, without the step."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def expected_scalars(records: list[dict]) -> dict[str, list]:
    """What TensorBoard should hold after logging `records` (log.jsonl): {tag: [(step, value), ...]}, float32-close."""
    import pytest

    expected: dict[str, list] = {}
    for record in records:
        for key, value in logged_numbers(record).items():
            expected.setdefault(key, []).append((record["step"], pytest.approx(value, rel=1e-6, abs=1e-12)))
    return expected


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag under a TensorBoard log directory, as (step, value) in step order, after TensorBoard's own
    purging of the steps a resumed run logged again."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_history(wandb_dir: Path) -> list[dict]:
    """The history rows ({"_step": step, key: value}) of the one offline run under `wandb_dir` (wandb.init's
    dir/wandb), read from its transaction log run-<id>.wandb: a LevelDB-style log of wandb_internal Record messages
    after a 7-byte ":W&B" header, in 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2

    (run_file,) = wandb_dir.glob("offline-run-*/run-*.wandb")
    data, block, position, pending, rows = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", data[:7]
    while position + 7 <= len(data):
        left = block - position % block
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left < 7 or (length, kind) == (0, 0):  # a block's padding
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
