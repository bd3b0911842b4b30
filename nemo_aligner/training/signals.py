"""Stopping a run early without losing work: preemption signals and `trainer.max_time`.

SIGTERM and SIGUSR1 (what Slurm sends at a time limit, with `--signal`, or on preemption) and the
`trainer.max_time` budget ("DD:HH:MM:SS", counted from the start of the run) all end a run the same way:
the current optimiser step finishes, a checkpoint is saved, nothing is exported, and the entry script
exits with EXIT_STOPPED (75, sysexits' EX_TEMPFAIL: "try again later"). Rerunning the same command
continues the exact trajectory.

- A signal only sets a flag; the loop looks at it after each step. The first signal also restores the
  default handlers, so a second one ends the process at once: the checkpoint being written is a temporary
  folder (training.checkpoint), so the previous checkpoint stays intact and is where the rerun resumes.
- max_time stops once the time left is less than the longest step seen plus the longest checkpoint save
  seen (before the first save of this process, the longest step stands in for it).
- Every rank must stop after the same step: the decision is all-reduced over the world (a signal that
  reached one rank stops them all).
"""

import logging
import signal
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger("nemo_aligner")

EXIT_STOPPED = 75  # a stopped run (signal or max_time), checkpoint saved: rerun to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_NONE, _MAX_TIME, _SIGNAL = 0, 1, 2  # all-reduced with MAX: a signal outranks the time budget


class StopWatch:
    """Watches for stop signals and the time budget; `should_stop()` after each step says whether to stop."""

    def __init__(self, max_seconds: float | None = None, started_at: float | None = None):
        """max_seconds: trainer.max_time in seconds (config.sections.parse_max_time); started_at: the run's
        start on time.monotonic()'s clock."""
        self.budget = max_seconds
        self.started_at = time.monotonic() if started_at is None else started_at
        self.signal_name: str | None = None
        self.longest_iteration = 0.0
        self.longest_save: float | None = None
        self._previous: dict = {}

    # ------------------------------------------------------------------ handlers
    def install(self) -> "StopWatch":
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            log.warning("not in the main thread: SIGTERM/SIGUSR1 will not stop the run cleanly")
            return self
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        for sig in STOP_SIGNALS:  # a second signal (e.g. during the save) ends the process at once
            signal.signal(sig, signal.SIG_DFL)

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()

    # ------------------------------------------------------------------ the decision
    def note_iteration(self, seconds: float) -> None:
        self.longest_iteration = max(self.longest_iteration, seconds)

    def note_save(self, seconds: float) -> None:
        self.longest_save = max(self.longest_save or 0.0, seconds)

    def time_left(self) -> float | None:
        return None if self.budget is None else self.budget - (time.monotonic() - self.started_at)

    def _local_code(self) -> int:
        if self.signal_name is not None:
            return _SIGNAL
        left = self.time_left()
        reserve = self.longest_iteration + (self.longest_save if self.longest_save is not None
                                            else self.longest_iteration)
        return _MAX_TIME if left is not None and left < reserve else _NONE

    def should_stop(self) -> str | None:
        """None, or why the run stops now ("SIGTERM", "SIGUSR1", "trainer.max_time"); the same on every rank."""
        code = self._local_code()
        if dist.is_initialized():
            flag = torch.tensor([code], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        if code == _SIGNAL:
            return self.signal_name or "a stop signal (on another rank)"
        if code == _MAX_TIME:
            return "trainer.max_time"
        return None
