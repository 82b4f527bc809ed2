"""Processes and devices: accelerator quirks, DeepSpeed settings, and the collectives the training loops use.

Every collective of ours goes through `Collectives`, which moves its tensors to the process's own device first:
NCCL has no CPU tensors, and gloo (the CPU tests) would accept the CPU tensors that NCCL rejects, so a test on CPU
could not catch a misplaced tensor. tests/train/test_distributed.py checks that no other module of ours calls a
collective directly.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch


def use_cpu() -> bool:
    """Accelerator(cpu=...): CPU without CUDA, except under DeepSpeed, which brings its own accelerator
    (DS_ACCELERATOR=cpu) and refuses accelerate's plain CPU mode."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return False
    return not torch.cuda.is_available()


def fix_deepspeed_cpu_ranks(accelerator: Any) -> None:
    """Under DeepSpeed on CPU (DS_ACCELERATOR=cpu) accelerate finds no GPU backend and reports one process of
    rank 0 everywhere, although DeepSpeed has initialised torch.distributed (gloo) over all of them. Take the ranks
    from torch.distributed so sharding, main-process side effects and collectives are right."""
    if accelerator.state.deepspeed_plugin is None or not torch.distributed.is_initialized():
        return
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if accelerator.num_processes == world:
        return
    from accelerate.state import PartialState

    for state in (PartialState(), accelerator.state):  # both keep their own shared copy
        state.num_processes, state.process_index = world, rank
        state.local_process_index = int(os.environ.get("LOCAL_RANK", rank))


def zero_stage(accelerator: Any) -> int:
    """The DeepSpeed ZeRO stage, or 0 without DeepSpeed (or without an accelerator)."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def is_deepspeed(accelerator: Any) -> bool:
    return getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None) is not None


def configure_deepspeed(
    accelerator: Any, micro_batch_size: int, gradient_accumulation_steps: int, max_grad_norm: Optional[float]
) -> None:
    """Settings DeepSpeed reads from its own config, set from ours before `accelerator.prepare`.

    DeepSpeed wants a micro-batch size, which it usually reads from a dataloader. Gradient clipping: the accelerate
    configs say `gradient_clipping: auto`, which accelerate would fill with 1.0; our `max_grad_norm: null` means no
    clipping under DeepSpeed as under DDP (DeepSpeed clips only above 0).
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds_config = plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    ds_config["gradient_accumulation_steps"] = gradient_accumulation_steps
    ds_config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above
    ds_config["gradient_clipping"] = 0.0 if max_grad_norm is None else float(max_grad_norm)


@contextmanager
def gathered_trainable(accelerator: Any, model: Any) -> Iterator[None]:
    """Full trainable parameters on every process for saving/hashing (a no-op unless DeepSpeed ZeRO-3).
    Every process must enter it (the gather is collective)."""
    if zero_stage(accelerator) != 3:
        yield
        return
    import deepspeed

    params = [p for p in accelerator.unwrap_model(model).parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


class PlainAccumulation:
    """What a training loop uses of an Accelerator for gradient accumulation, for one process without one."""

    def __init__(self, steps: int):
        self.steps, self.micro_steps, self.sync_gradients = steps, 0, True

    @contextmanager
    def accumulate(self, model: Any) -> Iterator[None]:
        self.micro_steps += 1
        self.sync_gradients = self.micro_steps % self.steps == 0
        yield

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.steps).backward()

    def clip_grad_norm_(self, parameters: Any, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


@dataclass
class Collectives:
    """The collectives of one process group, each on `device` (the accelerator's), with results on the caller's
    device. One process: every call is the identity, and nothing needs torch.distributed."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    accelerator: Any = None  # for gather_for_metrics, which needs to know the dataloader's padding

    @classmethod
    def of(cls, accelerator: Any = None) -> "Collectives":
        if accelerator is None or accelerator.num_processes == 1:
            return cls(accelerator=accelerator)
        return cls(accelerator.process_index, accelerator.num_processes, torch.device(accelerator.device), accelerator)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over processes."""
        if self.world_size == 1:
            return tensor
        total = tensor.detach().to(self.device, copy=True)
        torch.distributed.all_reduce(total)
        return total.to(tensor.device)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every process's tensor (equal shapes), in rank order."""
        if self.world_size == 1:
            return [tensor]
        local = tensor.detach().to(self.device).contiguous()
        # A list all_gather rather than accelerate's gather: under DeepSpeed on CPU the latter takes the
        # all_gather_into_tensor path, which gloo rejects.
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, local)
        return [p.to(tensor.device) for p in parts]

    def gather_for_metrics(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every process's rows of a batch from a prepared dataloader, without the rows accelerate repeated to
        even out the last batch."""
        if self.accelerator is None:
            return tensors
        return tuple(self.accelerator.gather_for_metrics(tuple(t.to(self.device) for t in tensors)))

    def gather_rows(self, tensor: torch.Tensor, pad_value: float = 0) -> torch.Tensor:
        """Concatenate every process's (n, ...) tensor along dim 0 in rank order (equal n); trailing dimensions may
        differ between processes and are padded to the widest with `pad_value`."""
        if self.world_size == 1:
            return tensor
        shape = torch.tensor(tensor.shape, dtype=torch.long)
        widest = torch.stack(self.all_gather(shape)).max(dim=0).values
        pad = []
        for have, want in zip(reversed(tensor.shape[1:]), reversed(widest[1:].tolist())):
            pad += [0, int(want) - have]
        padded = torch.nn.functional.pad(tensor, pad, value=pad_value) if pad else tensor
        return torch.cat(self.all_gather(padded))


def end_training(accelerator: Any) -> None:
    """accelerate's end_training, once the prepared models are gone. DDP's reducer holds the process group and is
    destroyed with the GIL held: if it outlives the group, it destroys the group, which joins gloo's worker thread
    while that thread waits for the GIL to free a finished collective's tensors, and the process hangs at exit. So
    the accelerator lets go of its models (the caller has dropped its own) and they are collected while the group
    still exists; the group itself is then destroyed without the GIL."""
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
