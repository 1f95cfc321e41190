"""Where the server may connect on a tenant's behalf: public addresses only, checked once and pinned.

A tenant names a URL (a batch's ``webhook_url``) and the API POSTs to it from inside the cluster's
network, so an unchecked URL reaches what only the cluster can: the cloud's metadata service
(169.254.169.254), Redis, the workers' health ports, anything on 10/8. :class:`EgressPolicy` resolves
the host once, refuses any address that is not public (loopback, link-local, private, shared,
multicast, unspecified, reserved and documentation ranges, and IPv6 addresses that embed such an
IPv4 address: mapped, 6to4, Teredo, NAT64) unless the operator's allowlist names it, and
:func:`post` connects to exactly the addresses it checked: the URL keeps its host name, so the Host
header, SNI and certificate check are the name's, but no second DNS lookup happens (a name that
answers a public address to the check and 127.0.0.1 to the connect gets nowhere). Redirects are never
followed. Proxy variables (``HTTPS_PROXY``) are not used: a proxy would make the check meaningless.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import httpcore

from queueformer.contract.errors import Forbidden, TransientError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[IPAddress]]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_LOCAL_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


class AddressRefused(Forbidden):
    """The URL's host is, or resolves to, an address outside what the egress policy allows."""

    code = "address_refused"


class Unresolvable(TransientError):
    """The URL's host does not resolve (now): worth another try later."""

    code = "unresolvable_host"


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address the system resolver gives for ``host`` (numeric forms like ``127.1`` included)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise Unresolvable(f"{host} does not resolve: {exc}") from None
    found: list[IPAddress] = []
    for family, _type, _proto, _name, sockaddr in infos:
        text = str(sockaddr[0])
        if family == socket.AF_INET6 and len(sockaddr) >= 4 and sockaddr[3]:
            text = f"{text.split('%')[0]}%{sockaddr[3]}"  # keep the scope: fe80::1%2 is not fe80::1
        ip = ipaddress.ip_address(text)
        if ip not in found:
            found.append(ip)
    return found


def numeric(host: str) -> list[IPAddress] | None:
    """The addresses a numeric host stands for (``127.1``, ``0x7f.1``, ``[::1]``), or None for a name."""
    try:
        infos = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    return [ipaddress.ip_address(str(info[4][0])) for info in infos]


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address routes to: IPv4-mapped, 6to4, Teredo (server and client), NAT64."""
    if isinstance(ip, ipaddress.IPv4Address):
        return []
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def refusal(ip: IPAddress) -> str | None:
    """Why ``ip`` is no public address (loopback, private, ...), or None when it is one."""
    for candidate in (*embedded_ipv4(ip), ip):
        reason = _kind(candidate)
        if reason is not None:
            return reason if candidate == ip else f"{reason} ({candidate} inside {ip})"
    return None


def _kind(ip: IPAddress) -> str | None:
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_private:  # RFC 1918, fc00::/7, and the documentation and benchmark ranges
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:  # 100.64.0.0/10 (carrier-grade NAT) and the like
        return "not public"
    return None


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (in order) and the name to speak to."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[IPAddress, ...]

    @property
    def origin(self) -> str:
        """``scheme://host:port`` without path or query (which may carry a receiver's token): for logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL, for logs that must not show its path or query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"


@dataclass(frozen=True)
class EgressPolicy:
    """Public addresses, plus the networks and host names the operator allows."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()  # from "*.internal": any name ending in ".internal"
    resolver: Resolver = field(default=resolve, compare=False)

    @classmethod
    def from_allowlist(cls, entries: Iterable[str], resolver: Resolver = resolve) -> EgressPolicy:
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        suffixes: list[str] = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            name = entry.lower().rstrip(".")
            if name.startswith("*."):
                suffixes.append(name[1:])
            else:
                hosts.add(name)
        return cls(tuple(networks), frozenset(hosts), tuple(suffixes), resolver)

    def host_allowed(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        return name in self.hosts or any(name.endswith(s) for s in self.suffixes)

    def address_refusal(self, ip: IPAddress) -> str | None:
        """Why the policy refuses ``ip``, or None."""
        plain = ipaddress.ip_address(str(ip).split("%")[0])
        if any(a in n for a in (plain, *embedded_ipv4(plain)) for n in self.networks if a.version == n.version):
            return None
        return refusal(ip)

    def check_literal(self, url: str) -> None:
        """At submission: refuse a URL whose host is a refused address or a loopback name, without DNS.

        Names are checked when the webhook is sent, against what they resolve to then.
        """
        host = _host(url)
        if self.host_allowed(host):
            return
        _refuse_local_name(host)
        for ip in numeric(host) or []:
            reason = self.address_refusal(ip)
            if reason is not None:
                raise AddressRefused(f"{host} is {ip} ({reason}){_ONLY_PUBLIC}", param="webhook_url")

    def check(self, url: str) -> Target:
        """Resolve the URL's host once and check every address; the Target pins what was checked."""
        host = _host(url)
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        allowed = self.host_allowed(host)
        if not allowed:
            _refuse_local_name(host)
        addresses = numeric(host) or self.resolver(host, port)
        if not addresses:
            raise Unresolvable(f"{host} resolves to no address")
        if not allowed:
            # Every address must pass: a name that also answers 10.0.0.1 is refused, whichever came first.
            for ip in addresses:
                reason = self.address_refusal(ip)
                if reason is not None:
                    raise AddressRefused(f"{host} resolves to {ip} ({reason}){_ONLY_PUBLIC}", param="webhook_url")
        return Target(url, scheme, host, port, tuple(addresses))


_ONLY_PUBLIC = ": webhooks are sent to public addresses only, unless the operator allows others"


def _refuse_local_name(host: str) -> None:
    """Names that are loopback by definition (RFC 6761), whatever a resolver would say of them."""
    name = host.lower().rstrip(".")
    if name in _LOCAL_NAMES or name.endswith(".localhost"):
        raise AddressRefused(f"{host} is a loopback name{_ONLY_PUBLIC}", param="webhook_url")


def _host(url: str) -> str:
    try:
        host = urlsplit(url).hostname
    except ValueError as exc:
        raise AddressRefused(f"not a valid URL: {exc}", param="webhook_url") from None
    if not host:
        raise AddressRefused("the URL has no host", param="webhook_url")
    # "[fe80::1%25eth0]" names zone eth0 (RFC 6874); the resolver wants "fe80::1%eth0".
    return unquote(host)


@dataclass
class Response:
    status: int
    location: str | None


def post(
    target: Target,
    body: bytes,
    headers: Sequence[tuple[str, str]],
    *,
    connect_timeout: float,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> Response:
    """POST ``body`` to the checked target, connecting only to its pinned addresses, within ``timeout`` in all.

    The response body is not read. Raises httpcore's errors (ConnectError, TimeoutException, ...).
    """
    deadline = time.monotonic() + timeout
    backend = _PinnedBackend(target.addresses, deadline)
    phase = {"connect": min(connect_timeout, timeout), "read": timeout, "write": timeout, "pool": timeout}
    with (
        httpcore.ConnectionPool(ssl_context=ssl_context, network_backend=backend, max_connections=1) as pool,
        pool.stream(
            "POST",
            target.url,
            headers=[(k.encode(), v.encode()) for k, v in headers],
            content=body,
            extensions={"timeout": phase},
        ) as resp,
    ):
        location = next((v.decode("latin-1") for k, v in resp.headers if k.lower() == b"location"), None)
        return Response(resp.status, location)


class _PinnedBackend(httpcore.SyncBackend):
    """Connects to the checked addresses whatever host name httpcore asks for, within one deadline."""

    def __init__(self, addresses: Sequence[IPAddress], deadline: float) -> None:
        self.addresses = addresses
        self.deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        del host  # the name was resolved and checked once; connecting by it would resolve it again
        error: Exception = httpcore.ConnectError("no address to connect to")
        for ip in self.addresses:
            connect_to = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
            try:
                stream = super().connect_tcp(
                    str(connect_to), port, _left(self.deadline, timeout), local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
                continue
            return _DeadlineStream(stream, self.deadline)
        raise error


class _DeadlineStream(httpcore.NetworkStream):
    """Every read and write gets at most what is left of the attempt's time: a receiver that trickles a
    byte every few seconds cannot hold a delivery longer than one timeout."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self.inner = inner
        self.deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, _left(self.deadline, timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, _left(self.deadline, timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        inner = self.inner.start_tls(ssl_context, server_hostname, _left(self.deadline, timeout))
        return _DeadlineStream(inner, self.deadline)

    def get_extra_info(self, info: str) -> Any:
        return self.inner.get_extra_info(info)


def _left(
    deadline: float, timeout: float | None, error: type[httpcore.TimeoutException] = httpcore.ConnectTimeout
) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the attempt ran out of time")
    return left if timeout is None else min(timeout, left)
