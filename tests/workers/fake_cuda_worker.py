"""A worker whose process looks like it uses CUDA: ``fake_cuda_worker.py [STEPS]``.

A stand-in ``torch`` module with an initialised ``torch.cuda`` goes into
sys.modules, so the worker hooks' CUDA sampler reports per-device memory as
it does on a GPU machine. Nothing else of torch is faked (no c10d), and real
torch is never imported.
"""

import sys
import time
import types

import worker_hooks

cuda = types.SimpleNamespace(
    is_initialized=lambda: True,
    device_count=lambda: 2,
    # This rank uses device 1 only, as a rank of a multi-GPU node would.
    memory_reserved=lambda device: 6 << 30 if device == 1 else 0,
    memory_allocated=lambda device: 5 << 30 if device == 1 else 0,
    max_memory_allocated=lambda device: (5 << 30) + (1 << 28) if device == 1 else 0,
)
fake_torch = types.ModuleType("torch")
fake_torch.cuda = cuda  # type: ignore[attr-defined]
sys.modules["torch"] = fake_torch


@worker_hooks.worker_main()
def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else -1
    i = 0
    while i != steps:
        time.sleep(0.01)
        worker_hooks.step()
        i += 1


if __name__ == "__main__":
    main()
