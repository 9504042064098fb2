"""A small data-parallel training job for torchrun: ``ddp_train.py STOP_FILE [MAX_STEPS]``.

gloo on CPU, a tiny model, a few hundred milliseconds a step, rankside's
worker hooks, metrics and step(). It trains until STOP_FILE exists (every
rank stops at the same step) or MAX_STEPS, so that a test decides how long
it runs.
"""

import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

import worker_hooks
from worker_hooks import metrics

STEP_SECONDS = 0.2
SAMPLES = metrics.counter("samples_processed", "Training samples this rank processed.")
LOSS = metrics.gauge("train_loss", "Loss of the last step on this rank.")


@worker_hooks.worker_main()
def main() -> None:
    stop_file = sys.argv[1]
    max_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(1234 + rank)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    stop = torch.zeros(1)
    for _ in range(max_steps):
        started = time.monotonic()
        inputs = torch.randn(64, 16)
        target = inputs.sum(dim=1, keepdim=True)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(inputs), target)
        loss.backward()
        optimizer.step()
        SAMPLES.inc(len(inputs))
        LOSS.set(loss.item())
        worker_hooks.step()
        # Rank 0 decides when to stop; every rank learns it in the same step.
        stop.fill_(1.0 if rank == 0 and os.path.exists(stop_file) else 0.0)
        dist.all_reduce(stop)
        if stop.item() > 0:
            break
        time.sleep(max(0.0, STEP_SECONDS - (time.monotonic() - started)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
