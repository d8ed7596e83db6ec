"""Prometheus metrics and structured (JSON lines) logs of the relay server.

Logs carry routing facts only — route, status, caller fingerprint, message id, sizes, timings —
never a body, a header value other than those, or anything a sender wrote: the relay holds no
patient data and its logs must not acquire any.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["JsonFormatter", "Metrics", "log"]

log = logging.getLogger("medsecure.relay")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, event and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            doc["error"] = record.exc_info[0].__name__  # the type only: no message, no traceback
        return json.dumps(doc, separators=(",", ":"))


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event."""
    log.log(level, name, extra={"fields": fields})


class _Queue(Collector):
    def __init__(self, stats: Callable[[], tuple[int, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            count, size = self._stats()
        except Exception:  # a scrape must not fail because the database is busy
            return
        yield GaugeMetricFamily(
            "medsecure_relay_queue_depth", "Envelopes waiting for collection", value=count
        )
        yield GaugeMetricFamily(
            "medsecure_relay_queue_bytes", "Bytes waiting for collection", value=size
        )


class _Commits(Collector):
    """Group commit: durable transactions and the uploads and acknowledgements they carried
    (their ratio is the mean batch size)."""

    def __init__(self, commits: Any) -> None:
        self._commits = commits

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "medsecure_relay_commits",
            "Durable transactions of the group commit",
            value=self._commits.batches,
        )
        yield CounterMetricFamily(
            "medsecure_relay_committed_writes",
            "Uploads and acknowledgements committed by the group commit",
            value=self._commits.items,
        )


class Metrics:
    """The relay's counters, in a registry of its own (one per app)."""

    def __init__(self, stats: Callable[[], tuple[int, int]], commits: Any = None) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "medsecure_relay_messages",
            "Envelopes by event (accepted, replayed, downloaded, acknowledged, expired)",
            ["event"],
            registry=self.registry,
        )
        self.bytes = Counter(
            "medsecure_relay_bytes",
            "Envelope bytes by direction",
            ["direction"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "medsecure_relay_rejections",
            "Refused requests by reason (problem type)",
            ["reason"],
            registry=self.registry,
        )
        self.receiving = Gauge(
            "medsecure_relay_uploads_receiving",
            "Large uploads (above 64 KiB) whose body is arriving",
            registry=self.registry,
        )
        self.registry.register(_Queue(stats))
        if commits is not None:
            self.registry.register(_Commits(commits))
        self.started = time.time()

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data
