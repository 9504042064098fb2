"""A worker whose self-reported strings are HTML: ``hostile_worker.py [fail]``.

Its host name, role and one handler's name carry markup, and so do the
function and file name of the loop its stacks show (a stack dump, and an
incident's stack groups, print them); with ``fail`` it dies after a few steps
with an exception whose message is markup too. The page must show every one of
them as text. Importing this module (the tests do, for MARKUP) changes nothing.
"""

import os
import socket
import sys
import time
import types

MARKUP = '<img src=x onerror="window.__rankside_pwned=1">'


def main() -> None:
    # Before the connection reads the identity: these are the worker's to report.
    socket.gethostname = lambda: MARKUP
    os.environ["ROLE_NAME"] = MARKUP
    import worker_hooks

    worker_hooks.register_handler(MARKUP, lambda request: worker_hooks.Response(MARKUP))
    fail = sys.argv[1:] == ["fail"]
    # Python names a frame after its code object, which any program may rename.
    code = train.__code__.replace(co_name=MARKUP, co_qualname=MARKUP, co_filename=MARKUP)
    loop = types.FunctionType(code, globals())
    with worker_hooks.worker_main():
        loop(fail)


def train(fail: bool) -> None:
    import worker_hooks

    step = 0
    while True:
        if fail and step == 5:
            raise RuntimeError(MARKUP)
        time.sleep(0.02)
        worker_hooks.step()
        step += 1


if __name__ == "__main__":
    main()
