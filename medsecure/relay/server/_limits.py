"""Per-caller rate limiting: a token bucket per fingerprint, pure and clock-injected."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

__all__ = ["RateLimiter"]


class RateLimiter:
    """Token buckets of ``burst`` tokens refilled at ``rate`` per second, one per key.

    At most ``max_keys`` buckets are kept (least recently used dropped), so a flood of callers
    cannot grow memory without bound. Each server instance limits on its own: behind a load
    balancer the effective limit is the sum over instances.
    """

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str, now: float) -> float:
        """Take one token; return 0 if allowed, else the seconds to wait before retrying."""
        with self._lock:
            tokens, at = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate)
            if tokens >= 1.0:
                wait = 0.0
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return wait


def retry_after(wait: float) -> str:
    """A Retry-After value (whole seconds, at least 1)."""
    return str(max(1, math.ceil(wait)))
