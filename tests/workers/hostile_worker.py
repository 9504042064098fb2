"""A worker whose self-reported strings are HTML: ``hostile_worker.py [fail]``.

Its host name, role and one handler's name carry markup; with ``fail`` it
dies after a few steps with an exception whose message is markup too. The
page must show every one of them as text. Importing this module (the tests
do, for MARKUP) changes nothing.
"""

import os
import socket
import sys
import time

MARKUP = '<img src=x onerror="window.__rankside_pwned=1">'


def main() -> None:
    # Before the connection reads the identity: these are the worker's to report.
    socket.gethostname = lambda: MARKUP
    os.environ["ROLE_NAME"] = MARKUP
    import worker_hooks

    worker_hooks.register_handler(MARKUP, lambda request: worker_hooks.Response(MARKUP))
    fail = sys.argv[1:] == ["fail"]
    with worker_hooks.worker_main():
        step = 0
        while True:
            if fail and step == 5:
                raise RuntimeError(MARKUP)
            time.sleep(0.02)
            worker_hooks.step()
            step += 1


if __name__ == "__main__":
    main()
