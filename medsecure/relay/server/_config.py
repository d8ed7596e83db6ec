"""Settings of a relay server (the ``medsecure relay serve`` options map onto these), and the
rules that turn its public URLs into the authorities it answers for."""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

from ..._identity import PublicIdentity

__all__ = ["RelayConfig", "default_public_urls", "public_authorities"]

GiB = 1 << 30


@dataclass(frozen=True)
class RelayConfig:
    """Limits and policy of a relay. The defaults suit a regional relay of modest size."""

    max_envelope_bytes: int = 2 * GiB
    """Largest envelope accepted (413 above)."""
    mailbox_quota_bytes: int = 20 * GiB
    """Bytes that may wait in one mailbox (507 above)."""
    rate_per_second: float = 20.0
    """Sustained requests per second per caller (429 above, with Retry-After)."""
    rate_burst: int = 200
    """Requests a caller may make at once before the sustained rate applies."""
    signature_window: int = 60
    """Seconds a signature's ``created`` may differ from the server's clock."""
    retention_days: int = 90
    """Days an envelope waits for collection before it is deleted (1 to 365)."""
    sweep_interval: float = 60.0
    """Seconds between retention sweeps."""
    authorities: tuple[PublicIdentity, ...] = ()
    """If set, only senders vouched for by one of these authorities may upload."""
    list_limit: int = 1000
    """Most messages one listing returns."""
    public_urls: tuple[str, ...] = ()
    """The URLs clients reach this relay by (``scheme://host[:port]``): a request whose signed
    ``@authority`` names any other host is refused (421), so that a relay cannot replay its
    callers' requests to this one. :func:`medsecure.relay.server.serve` fills in the address it
    listens on when none is given; :func:`~medsecure.relay.server.create_app` requires them."""
    body_timeout: float = 60.0
    """Seconds an upload's body may send nothing before the relay abandons it (408)."""

    def __post_init__(self) -> None:
        if not 1 <= self.retention_days <= 365:
            raise ValueError("retention_days must be between 1 and 365")
        if self.max_envelope_bytes < 1 or self.mailbox_quota_bytes < 1:
            raise ValueError("sizes must be positive")
        if self.rate_per_second <= 0 or self.rate_burst < 1:
            raise ValueError("the rate limit must be positive")
        if not 1 <= self.signature_window <= 3600:
            raise ValueError("signature_window must be between 1 and 3600 seconds")
        if not all(isinstance(a, PublicIdentity) for a in self.authorities):
            raise TypeError("authorities must be PublicIdentity values")
        if not 0 < self.body_timeout <= 86400:
            raise ValueError("body_timeout must be between 0 and 86400 seconds")
        if isinstance(self.public_urls, str):
            raise TypeError("public_urls is a tuple of URLs")
        public_authorities(self.public_urls)  # ValueError for a malformed URL


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _host_form(host: str) -> str:
    """A host as it appears in an authority: lower case, an IPv6 address in brackets."""
    host = host.lower()
    return f"[{host}]" if ":" in host else host


def public_authorities(urls: Iterable[str]) -> frozenset[str]:
    """The ``Host`` values (RFC 9110 §7.2) a relay reachable at ``urls`` answers for: each URL's
    ``host:port``, and also the bare host when the port is its scheme's default (clients leave
    it out, as RFC 9421 §2.2.3 does for ``@authority``). Lower case: the comparison with a
    request's ``Host`` is a set look-up. Raises ValueError for anything but
    ``http(s)://host[:port][/]``."""
    out: set[str] = set()
    for url in urls:
        if not isinstance(url, str):
            raise TypeError("a public URL is a str")
        parts = urllib.parse.urlsplit(url.strip())
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"malformed public URL (port): {url!r}") from None
        if (
            parts.scheme not in _DEFAULT_PORTS
            or not parts.hostname
            or parts.username is not None
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
        ):
            raise ValueError(f"a public URL is http(s)://host[:port], not {url!r}")
        host = _host_form(parts.hostname)
        default = _DEFAULT_PORTS[parts.scheme]
        out.add(f"{host}:{port or default}")
        if port in (None, default):
            out.add(host)
    return frozenset(out)


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def default_public_urls(host: str, port: int, *, tls: bool) -> tuple[str, ...]:
    """The public URLs of a relay started without any: the address it listens on, and for a
    loopback address every loopback form of it (``localhost``, ``127.0.0.1``, ``[::1]`` with the
    same port all name this very listener). A relay listening on every interface (``0.0.0.0``,
    ``::``) or on an ephemeral port cannot know the name its clients use: ValueError, asking for
    ``--public-url``."""
    scheme = "https" if tls else "http"
    name = host.strip().strip("[]").lower()
    if not name or port == 0:
        raise ValueError("give the relay's public URL (--public-url)")
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    if address is not None and address.is_unspecified:
        raise ValueError(
            "the relay listens on every interface: give the URL its clients use"
            " (--public-url https://relay.example)"
        )
    loopback = name == "localhost" or (address is not None and address.is_loopback)
    names = [name, *(n for n in _LOOPBACK_NAMES if n != name)] if loopback else [name]
    return tuple(f"{scheme}://{_host_form(n)}:{port}" for n in names)
