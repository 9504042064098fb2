"""A raw protocol peer for tests that need to misbehave on purpose."""

from __future__ import annotations

import os
import socket
from typing import Any

from worker_hooks import protocol


class RawPeer:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def send(self, header: dict[str, Any], body: bytes = b"") -> None:
        self.sock.sendall(protocol.encode(header, body))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self, rank: int | None = None, version: int = protocol.PROTOCOL_VERSION) -> None:
        identity = {"rank": rank, "pid": os.getpid(), "hostname": "test", "role": "default"}
        self.send({"type": "hello", "version": version, "identity": identity, "handlers": []})

    def _read_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError("peer closed")
            data += chunk
        return data

    def read(self) -> tuple[dict[str, Any], bytes]:
        header_len, body_len = protocol.PREFIX.unpack(self._read_exactly(protocol.PREFIX_SIZE))
        data = self._read_exactly(header_len + body_len)
        return protocol.parse_header(data[:header_len]), data[header_len:]

    def closed_by_peer(self) -> bool:
        """True once the other side has closed (after any frames it sent first)."""
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()
