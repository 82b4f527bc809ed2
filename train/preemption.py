"""Graceful stop on SIGUSR1/SIGTERM: finish the current step, checkpoint, exit cleanly.

SLURM sends `--signal=USR1@<seconds>` before a time limit and SIGTERM on preemption; a training loop asks
`stop.should_stop(accelerator)` once per step and, when true, saves a checkpoint and returns. All processes
agree on the answer (a max-reduce), so no rank stops alone and leaves the others waiting in a collective.
"""

from __future__ import annotations

import logging
import signal
from typing import Iterable, Optional

import torch

from train.distributed import Collectives

log = logging.getLogger(__name__)

# Exit status of a run that stopped on a signal after checkpointing; SLURM templates requeue on it.
PREEMPTED_EXIT_CODE = 3


class StopSignal:
    def __init__(self, signals: Iterable[int] = (signal.SIGUSR1, signal.SIGTERM)):
        self.received: Optional[int] = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received %s: will checkpoint and stop after the current step", signal.Signals(signum).name)
        self.received = signum

    def should_stop(self, accelerator=None) -> bool:
        """True on every process as soon as any process received a signal."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        return bool(Collectives.of(accelerator).all_reduce_sum(flag).item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
