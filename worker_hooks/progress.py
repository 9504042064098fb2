"""Training progress: ``step()`` and the state the connection thread reports.

``step()`` runs on the training thread every iteration, so it only touches
plain attributes: no lock, no I/O, one clock read. A torn read by the
connection thread at worst reports a step one behind, which the next
heartbeat corrects.
"""

from __future__ import annotations

import time

from .metrics import REGISTRY

_clock = time.perf_counter


class Progress:
    """Step count, last step number and when the last step ended."""

    __slots__ = ("_last_mark", "_observe", "step", "steps")

    def __init__(self) -> None:
        self.steps = 0
        self.step = -1
        self._last_mark = 0.0
        histogram = REGISTRY.step_duration
        assert histogram is not None
        self._observe = histogram.observe

    def mark(self, step: int | None = None) -> None:
        """Mark one training step done, optionally with its number.

        Without a number the step is the count of ``step()`` calls so far, from 0.
        """
        # A monotonic clock, so that a clock adjustment never makes a step
        # look negative; wall time is derived only when a heartbeat needs it.
        now = _clock()
        steps = self.steps
        if steps:
            self._observe(now - self._last_mark)
        self._last_mark = now
        self.steps = steps + 1
        self.step = steps if step is None else step

    @property
    def progress_time(self) -> float:
        """Unix time of the last step, or 0.0 before the first."""
        if not self.steps:
            return 0.0
        return time.time() - (_clock() - self._last_mark)


PROGRESS = Progress()

# The bound method itself, so that a call costs one call, not two.
step = PROGRESS.mark
