"""Where the sidecars of a job are: URLs, and headless Service names resolved by DNS.

A job is a list of sidecar URLs: given with ``--target``, or found with
``--dns NAME:PORT``, which resolves every address of a Kubernetes headless
Service (one per ready pod). Kubernetes' DNS stays the membership: nothing
here keeps a list of nodes of its own. A name is resolved afresh each time,
blocking (``Targets.resolve``, the command line) or on the event loop
(``Targets.aresolve``, a sidecar's job routes).

"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.client.http import ConnectError
from sidecar.client.job import NodeStatus
from sidecar.values import host_and_port

AddressInfo = tuple[Any, ...]


class ResolveError(ConnectError):
    """A ``--dns`` name that is not NAME:PORT, or that does not resolve."""


@dataclass(frozen=True)
class Targets:
    """Where the sidecars of a job are: URLs, and headless Service names to resolve."""

    urls: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.urls or self.dns)

    def resolve(self) -> tuple[list[str], list[NodeStatus]]:
        """The URLs to ask, and a failed node for each name that did not resolve."""
        found: list[list[str] | ResolveError] = []
        for name in self.dns:
            try:
                found.append(resolve_dns(name))
            except ResolveError as exc:
                found.append(exc)
        return self._merge(found)

    async def aresolve(self) -> tuple[list[str], list[NodeStatus]]:
        """``resolve`` on the running event loop: every name at once, none blocking it."""

        async def one(name: str) -> list[str] | ResolveError:
            try:
                return await resolve_dns_async(name)
            except ResolveError as exc:
                return exc

        return self._merge(await asyncio.gather(*(one(name) for name in self.dns)))

    def _merge(
        self, found: Sequence[list[str] | ResolveError]
    ) -> tuple[list[str], list[NodeStatus]]:
        urls = list(self.urls)
        failed: list[NodeStatus] = []
        for name, result in zip(self.dns, found, strict=True):
            if isinstance(result, ResolveError):
                failed.append(NodeStatus.failed(f"dns:{name}", result))
            else:
                urls.extend(result)
        return list(dict.fromkeys(urls)), failed


def url_of(address: str, port: int) -> str:
    """``http://ADDRESS:PORT``, with IPv6 addresses in brackets."""
    try:
        is_v6 = ipaddress.ip_address(address).version == 6
    except ValueError:
        is_v6 = False
    return f"http://[{address}]:{port}" if is_v6 else f"http://{address}:{port}"


def _host_port(spec: str) -> tuple[str, int]:
    try:
        return host_and_port(spec)
    except ValueError as exc:
        raise ResolveError(f"--dns {exc}") from None


def _unresolved(host: str, exc: OSError) -> ResolveError:
    return ResolveError(
        f"cannot resolve {host}: {exc}. Is it the name of the job's headless Service "
        "(clusterIP: None), and is this inside the cluster?"
    )


def _urls(infos: Sequence[AddressInfo], port: int) -> list[str]:
    """One URL per distinct address; IPv4 first, then IPv6, each in order."""
    addresses = dict.fromkeys(str(info[4][0]) for info in infos)
    return sorted((url_of(a, port) for a in addresses), key=_address_order)


def resolve_dns(spec: str) -> list[str]:
    """Every address of ``NAME:PORT`` as a URL: a headless Service has one per ready pod."""
    host, port = _host_port(spec)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise _unresolved(host, exc) from None
    return _urls(infos, port)


async def resolve_dns_async(spec: str) -> list[str]:
    """``resolve_dns`` through the event loop's resolver."""
    host, port = _host_port(spec)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise _unresolved(host, exc) from None
    return _urls(infos, port)


def _address_order(url: str) -> tuple[int, str]:
    return (url.startswith("http://["), url)
