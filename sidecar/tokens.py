"""The bearer token file, as the sidecar and the command-line client both read it."""

from __future__ import annotations

import logging
import os
import stat

log = logging.getLogger("rankside.sidecar")


class TokenError(Exception):
    """The token file is unusable."""


def read_token(path: str, warn_if_shared: bool = True) -> str:
    """The token in ``path``: the whole file without surrounding whitespace, not empty.

    A token with whitespace inside (two lines, ``key value``) is refused: no
    ``Authorization`` header could ever carry it, so no request would
    authenticate.

    The sidecar warns when others may read the file; the command-line client,
    which only sends the token, reads it with ``warn_if_shared=False``.
    """
    try:
        with open(path, encoding="utf-8") as fp:
            token = fp.read().strip()
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise TokenError(f"cannot read the token file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise TokenError(f"cannot read the token file {path}: {exc}") from None
    if not token:
        raise TokenError(f"the token file {path} is empty")
    if any(char.isspace() or not char.isprintable() for char in token):
        raise TokenError(
            f"the token file {path} holds more than one line or word: "
            "a token is one word on one line"
        )
    if warn_if_shared and mode & (stat.S_IRGRP | stat.S_IROTH):
        # Not fatal: a Kubernetes secret is mounted 0644 unless told otherwise.
        log.warning("the token file %s is readable by other users (mode %o)", path, mode & 0o777)
    return token
