"""Training progress: ``step()`` and the state the connection thread reports.

``step()`` runs on the training thread every iteration, so it only touches
plain attributes: no lock, no I/O. A torn read by the connection thread at
worst reports a step one behind, which the next heartbeat corrects.
"""

from __future__ import annotations

import time

from .metrics import observe_step_duration


class Progress:
    """Step count, last step number and the time of the last progress."""

    __slots__ = ("_last_mark", "progress_time", "step", "steps")

    def __init__(self) -> None:
        self.steps = 0
        self.step = -1
        self.progress_time = 0.0
        self._last_mark = 0.0

    def mark(self, step: int | None = None) -> None:
        # Monotonic, so a clock adjustment never makes a step look negative.
        now = time.perf_counter()
        if self.steps:
            observe_step_duration(now - self._last_mark)
        self._last_mark = now
        self.steps += 1
        self.step = self.steps - 1 if step is None else step
        self.progress_time = time.time()


PROGRESS = Progress()


def step(step: int | None = None) -> None:
    """Mark one training step done, optionally with its number.

    Without a number the step is the count of ``step()`` calls so far, from 0.
    """
    PROGRESS.mark(step)
