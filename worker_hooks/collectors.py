"""The collectors every worker has: the CPU time and resident memory of its process, and its
CUDA memory per device once the program uses CUDA. They sample when the registry collects,
once per flush on the connection thread, never on the training thread; like
prometheus_client's process collector they hand the registry readings rather than metric
objects, so this module needs nothing of ``metrics``, which installs them.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

from .protocol import MetricType
from .registry import Family, Series, SeriesRegistry


class Reading(Series):
    """A sampled series: its collector sets ``value`` before each collection."""

    __slots__ = ("value",)

    def __init__(self, family: Family, labelvalues: tuple[str, ...] = ()) -> None:
        super().__init__(family, labelvalues)
        self.value = 0.0

    def _read(self) -> float:
        return self.value


class _SingleReading(Reading, Family):
    """A built-in family without labels, which is its own one reading."""

    def __init__(self, kind: MetricType, name: str, documentation: str) -> None:
        Family.__init__(self, kind, name, documentation, (), builtin=True)
        Reading.__init__(self, self)


def _single_reading(
    registry: SeriesRegistry, kind: MetricType, name: str, documentation: str
) -> _SingleReading:
    reading = _SingleReading(kind, name, documentation)
    if registry.register(reading) is not reading:
        raise ValueError(f"{name!r} is defined in this registry already")
    return reading


class ProcessCollector:
    """CPU time (user and system) and resident memory of the worker process."""

    def __init__(self, registry: SeriesRegistry) -> None:
        self._cpu = _single_reading(
            registry, "counter", "rankside_worker_cpu_seconds",
            "User and system CPU time of the worker process.")  # fmt: skip
        self._rss = _single_reading(
            registry, "gauge", "rankside_worker_resident_memory_bytes",
            "Resident memory of the worker process.")  # fmt: skip
        self._page_size = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def __call__(self) -> None:
        times = os.times()
        # Counters only go up; CPU time of a live process does too.
        self._cpu.value = max(self._cpu.value, times.user + times.system)
        rss_bytes = _resident_bytes(self._page_size)
        if rss_bytes is not None:
            self._rss.value = float(rss_bytes)


def _resident_bytes(page_size: int) -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * page_size
    except (OSError, ValueError, IndexError):
        return None


class CudaCollector:
    """CUDA memory per device, read only if the program already uses CUDA.

    Importing torch here would add seconds to every worker's start-up and
    calling into CUDA before the program does would create a context, so the
    collector looks for a torch module that is already imported with CUDA
    initialised. Only devices this process has memory reserved on are
    reported, so eight ranks on eight GPUs give eight series, not 64.
    """

    def __init__(self, registry: SeriesRegistry) -> None:
        self._registry = registry
        self._allocated, self._reserved, self._peak = (
            registry.register(Family("gauge", name, documentation, ("device",), builtin=True))
            for name, documentation in (
                ("rankside_worker_cuda_memory_allocated_bytes",
                 "CUDA memory occupied by tensors of the worker, per device."),
                ("rankside_worker_cuda_memory_reserved_bytes",
                 "CUDA memory held by the worker's caching allocator, per device."),
                ("rankside_worker_cuda_memory_peak_bytes",
                 "Peak CUDA memory occupied by tensors of the worker, per device."),
            )
        )  # fmt: skip
        self._readings: dict[tuple[Family, int], Reading] = {}
        self._seen: set[int] = set()

    def __call__(self) -> None:
        torch: ModuleType | None = sys.modules.get("torch")
        cuda = getattr(torch, "cuda", None)
        if cuda is None or not cuda.is_initialized():
            return
        for device in range(cuda.device_count()):
            reserved = cuda.memory_reserved(device)
            if not reserved and device not in self._seen:
                continue
            self._seen.add(device)
            for family, value in (
                (self._allocated, cuda.memory_allocated(device)),
                (self._reserved, reserved),
                (self._peak, cuda.max_memory_allocated(device)),
            ):
                reading = self._reading(family, device)
                if reading is not None:
                    reading.value = float(value)

    def _reading(self, family: Family, device: int) -> Reading | None:
        """The reading of ``family`` for ``device``; None while the series limit refuses it."""
        reading = self._readings.get((family, device))
        if reading is None:
            labelvalues = (str(device),)
            reading = self._registry.add_series(family, lambda: Reading(family, labelvalues))
            if reading is not None:
                self._readings[family, device] = reading
        return reading


def install(registry: SeriesRegistry) -> None:
    """Define the collectors' families in ``registry`` and sample them at each collection."""
    registry.add_collect_hook(ProcessCollector(registry))
    registry.add_collect_hook(CudaCollector(registry))
