"""Training progress: ``step()`` and the state the connection thread reports.

``step()`` runs on the training thread every iteration, so it only touches
plain attributes: no lock, no I/O, one clock read. A torn read by the
connection thread at worst reports a step one behind, which the next
heartbeat corrects.
"""

from __future__ import annotations

import operator
import time

from .metrics import REGISTRY
from .protocol import INT_LIMIT

_clock = time.perf_counter

# The step numbers a heartbeat may carry: the protocol's 64-bit integers.
# Both bounds precomputed: negating a big int on every step allocates.
STEP_LIMIT = INT_LIMIT
_STEP_MIN = -STEP_LIMIT


def step_number(value: object) -> int:
    """``value`` as a step number, or TypeError/ValueError naming it.

    Training code passes what it has: an int-like tensor or a numpy integer
    becomes an int through ``__index__`` (so neither library is imported);
    a bool, a float (NaN included), a string or an out-of-range integer is
    refused here, in the training thread, instead of making every heartbeat
    a frame the sidecar rejects.
    """
    if isinstance(value, bool):
        raise TypeError(f"step must be an integer, not the bool {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"step must be an integer, not {type(value).__name__} {_shown(value)}"
        ) from None
    if not _STEP_MIN <= number < STEP_LIMIT:
        raise ValueError(f"step {_shown(number)} is out of range (a 64-bit integer)")
    return number


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
        A number that is not an integer is refused at once (``step_number``).
        """
        # The common cases cost one test each: no number, or a plain int in
        # range; the bounds are literals (-STEP_LIMIT, STEP_LIMIT - 1), loaded as constants.
        if step is not None and (
            type(step) is not int or not -0x8000_0000_0000_0000 <= step <= 0x7FFF_FFFF_FFFF_FFFF
        ):
            step = step_number(step)
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
