"""Prometheus metrics, read from the sidecar's counters at scrape time.

The hot path only bumps plain Python counters in :class:`~trio_tproxy.proxy.Stats`
(ints, ``Counter`` entries and the two-line :class:`Histogram` below, once per
connection, never per message).  :class:`SidecarCollector` turns them into
metric families when ``/metrics`` is scraped, so the cost of metrics is paid
by the scraper, not by the traffic.  prometheus_client provides the registry,
the exposition format (and its content negotiation) and the process metrics
(``process_open_fds``, ``process_resident_memory_bytes``, ...).

Metric names (all ``trio_tproxy_``-prefixed except the process ones):

=============================================  =======  ===============================
``connections_total{direction,outcome}``       counter  every connection, once, at its end
``refusals_total{direction,reason}``           counter  the refused ones, by reason
``active_connections``                         gauge    accepted and not yet ended
``pending_handshakes``                         gauge    TLS handshakes in progress
``bytes_total{direction,flow}``                counter  flow: sent (app->peer) / received
``handshake_duration_seconds{direction,handshake}``  histogram  handshake: full / resumed
``connection_duration_seconds{direction}``     histogram  accept to end
``rule_repairs_total``                         counter  drift checks that restored something
``rule_check_failures_total``                  counter  drift checks that failed
``credential_expiry_timestamp_seconds``        gauge    our certificate's notAfter (Unix)
``draining``                                   gauge    1 from SIGTERM until exit
``udp_events_total{event}``                    counter  with --intercept-udp: flows, packets, drops
``process_open_fds`` (and ``process_*``)       gauge    prometheus_client's ProcessCollector
=============================================  =======  ===============================

Bytes and durations are counted when a connection ends (like Envoy's TCP
proxy without periodic flushes): a long transfer appears in
``bytes_total`` when it finishes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

    from .proxy import Stats

# prometheus_client (about 2.4 MB of RSS with what it imports) is imported on
# the first scrape, not at start: the hot path only needs Histogram and the
# bucket bounds below, and many sidecars are never scraped.

#: Handshakes: a resumed one on a LAN takes well under a millisecond, a full
#: one a few ms, one over a slow link or a loaded node tens of ms.
HANDSHAKE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
#: Connections: from one request to long-lived streams.
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0)


class Histogram:
    """Bucket counts and a sum: ``observe`` is one bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


class SidecarCollector:
    """A prometheus_client collector over a :class:`Stats` (read at scrape time)."""

    def __init__(self, stats: Stats, extra: Callable[[], dict[str, float]] | None = None) -> None:
        self.stats = stats
        #: Gauges known to lifecycle (credential expiry, draining), read per scrape.
        self.extra = extra

    def describe(self) -> Iterable[Metric]:
        return []  # not known before a collect (labels vary); fine for a custom registry

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        s = self.stats
        conns = CounterMetricFamily(
            "trio_tproxy_connections",
            "Connections ended, by direction and outcome.",
            labels=["direction", "outcome"],
        )
        for (direction, outcome), n in sorted(s.connections.items()):
            conns.add_metric([direction, outcome], n)
        yield conns
        refusals = CounterMetricFamily(
            "trio_tproxy_refusals",
            "Connections refused, by direction and reason.",
            labels=["direction", "reason"],
        )
        for (direction, reason), n in sorted(s.refusals.items()):
            refusals.add_metric([direction, reason], n)
        yield refusals
        yield GaugeMetricFamily(
            "trio_tproxy_active_connections", "Connections accepted and not yet ended.", s.active
        )
        yield GaugeMetricFamily(
            "trio_tproxy_pending_handshakes", "TLS handshakes in progress.", s.pending_handshakes
        )
        nbytes = CounterMetricFamily(
            "trio_tproxy_bytes",
            "Application bytes carried by ended connections; flow sent: app to peer.",
            labels=["direction", "flow"],
        )
        for key, n in sorted(s.bytes.items()):
            direction, _, flow = key.partition("_")
            nbytes.add_metric([direction, flow], n)
        yield nbytes
        hs = HistogramMetricFamily(
            "trio_tproxy_handshake_duration_seconds",
            "TLS handshake duration, full or resumed.",
            labels=["direction", "handshake"],
        )
        for (direction, kind), hist in sorted(s.handshake_seconds.items()):
            hs.add_metric([direction, kind], hist.cumulative(), hist.sum)
        yield hs
        dur = HistogramMetricFamily(
            "trio_tproxy_connection_duration_seconds",
            "Connection duration, accept to end.",
            labels=["direction"],
        )
        for direction, hist in sorted(s.duration_seconds.items()):
            dur.add_metric([direction], hist.cumulative(), hist.sum)
        yield dur
        yield CounterMetricFamily(
            "trio_tproxy_rule_repairs",
            "Drift checks that restored the nft table or policy routes.",
            s.rule_repairs,
        )
        yield CounterMetricFamily(
            "trio_tproxy_rule_check_failures", "Drift checks that failed.", s.rule_check_failures
        )
        if s.udp:  # --intercept-udp only: a TCP-only sidecar's metrics are unchanged
            udp = CounterMetricFamily(
                "trio_tproxy_udp_events",
                "UDP over DTLS: flows ended by direction_outcome, packets and bytes each "
                "way, datagrams dropped by reason (drop_*), cookies sent.",
                labels=["event"],
            )
            for event, n in sorted(s.udp.items()):
                udp.add_metric([event], n)
            yield udp
        for name, value in (self.extra() if self.extra else {}).items():
            yield GaugeMetricFamily(f"trio_tproxy_{name}", _HELP.get(name, name), value)


_HELP = {
    "credential_expiry_timestamp_seconds": "notAfter of our certificate, Unix time.",
    "draining": "1 while draining after SIGTERM.",
}


def registry(
    stats: Stats, extra: Callable[[], dict[str, float]] | None = None
) -> CollectorRegistry:
    """A registry of our own (not the global one): the sidecar's and the process's metrics."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    reg.register(SidecarCollector(stats, extra))  # type: ignore[arg-type]
    ProcessCollector(registry=reg)
    return reg
