"""Defines metrics with names that end in a newline, then a good one, and keeps stepping.

Prints ``refused <name>`` for each bad name the metrics API refuses at the call.
"""

import time

import worker_hooks
from worker_hooks import metrics

for name, labels in (("nl_name\n", []), ("nl_label", ["kind\n"])):
    try:
        metrics.counter(name, "x", labels).inc()
    except ValueError as exc:
        print(f"refused {name!r}: {exc}", flush=True)

GOOD = metrics.counter("careless_good", "A metric defined after the refused ones.")


@worker_hooks.worker_main()
def main() -> None:
    while True:
        GOOD.inc()
        worker_hooks.step()
        time.sleep(0.02)


if __name__ == "__main__":
    main()
