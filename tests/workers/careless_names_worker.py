"""Careless metric definitions, then good ones; keeps stepping.

Names ending in a newline, a help text and a label value with a lone surrogate:
prints ``refused ...`` for each one the metrics API refuses at the call.
"""

import time

import worker_hooks
from worker_hooks import metrics

for name, labels in (("nl_name\n", []), ("nl_label", ["kind\n"])):
    try:
        metrics.counter(name, "x", labels).inc()
    except ValueError as exc:
        print(f"refused {name!r}: {exc}", flush=True)

try:
    metrics.gauge("surrogate_help", "bad \udc80 help")
except ValueError as exc:
    print(f"refused help: {exc}", flush=True)
PATHS = metrics.counter("careless_paths", "Files seen.", ["path"])
try:
    PATHS.labels(path="data-\udc80.bin").inc()
except ValueError as exc:
    print(f"refused label value: {exc}", flush=True)
PATHS.labels(path=7).inc()  # not a str: coerced with str() as prometheus_client does

COUNT = metrics.counter("careless_count", "A counter given bad amounts.")
HIST = metrics.histogram("careless_hist", "A histogram given NaN.", buckets=[1])
for name, call in (
    ("counter nan", lambda: COUNT.inc(float("nan"))),
    ("counter negative", lambda: COUNT.inc(-1)),
    ("histogram nan", lambda: HIST.observe(float("nan"))),
):
    try:
        call()
    except ValueError as exc:
        print(f"refused {name}: {exc}", flush=True)
metrics.gauge("careless_nan", "A gauge set to NaN.").set(float("nan"))
metrics.gauge("careless_inf", "A gauge set to +Inf.").set(float("inf"))

GOOD = metrics.counter("careless_good", "A metric defined after the refused ones.")


@worker_hooks.worker_main()
def main() -> None:
    while True:
        GOOD.inc()
        worker_hooks.step()
        time.sleep(0.02)


if __name__ == "__main__":
    main()
