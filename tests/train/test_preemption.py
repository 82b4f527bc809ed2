"""train/preemption.py: the stop signal shared by SFT and PPO."""

import os
import signal

from train.preemption import StopSignal


def test_stop_signal_is_seen_after_sigusr1():
    stop = StopSignal()
    try:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop() and stop.received == signal.SIGUSR1
    finally:
        stop.restore()
