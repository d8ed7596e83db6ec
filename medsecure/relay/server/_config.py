"""Settings of a relay server (the ``medsecure relay serve`` options map onto these)."""

from __future__ import annotations

from dataclasses import dataclass

from ..._identity import PublicIdentity

__all__ = ["RelayConfig"]

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
