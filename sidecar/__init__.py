"""rankside sidecar: one per node, between the workers and everyone who watches them.

The packages are layers, each importing only those below it (``make lint``
checks it): ``cli`` (options, commands, ``serve``, ``run``) over ``http`` (the
Starlette app and its routes) over ``node`` (the node server: workers, their
connections, calls, stalls, dumps, events) and ``client`` (the HTTP client and
job-wide views), which know nothing of each other; then ``metrics`` (the
workers' series and the exposition), ``config`` and ``tokens``, and at the
bottom ``schema`` (the API's shapes) and ``values`` (the validators).
"""
