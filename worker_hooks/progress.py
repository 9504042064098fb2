"""Training progress: ``step()`` and the state the connection thread reports.

``step()`` runs on the training thread every iteration, so it only touches
plain attributes: no lock, no I/O. A torn read by the connection thread at
worst reports a step one behind, which the next heartbeat corrects.
"""

from __future__ import annotations

import time


class Progress:
    """Step count, last step number and the time of the last progress."""

    __slots__ = ("progress_time", "step", "steps")

    def __init__(self) -> None:
        self.steps = 0
        self.step = -1
        self.progress_time = 0.0

    def mark(self, step: int | None = None) -> None:
        self.steps += 1
        self.step = self.steps - 1 if step is None else step
        self.progress_time = time.time()


PROGRESS = Progress()


def step(step: int | None = None) -> None:
    """Mark one training step done, optionally with its number.

    Without a number the step is the count of ``step()`` calls so far, from 0.
    """
    PROGRESS.mark(step)
