"""Prometheus text exposition of the server's counters, gauges and latency histograms
(hand-written: the format is a few lines, https://prometheus.io/docs/instrumenting/exposition_formats/)."""

from __future__ import annotations

import threading
import time
from bisect import bisect_left

from hrpo.engine.scheduler import Scheduler

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, name: str, doc: str):
        self.name, self.doc = name, doc
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, x: float) -> None:
        self.counts[bisect_left(BUCKETS, x)] += 1
        self.sum += x

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, count in zip(BUCKETS + (float("inf"),), self.counts):
            total += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        return out + [f"{self.name}_sum {self.sum}", f"{self.name}_count {total}"]


class Track:
    """One request's timings: time to first token, between tokens, end to end."""

    def __init__(self, metrics: Metrics):
        self.metrics, self.start, self.last = metrics, time.perf_counter(), None

    def tokens(self, t: float, count: int) -> None:
        if not count:
            return
        m = self.metrics
        with m.lock:
            if self.last is None:
                m.ttft.observe(t - self.start)
            else:
                m.itl.observe(t - self.last)
        self.last = t

    def finish(self, outcome: str, completion_tokens: int = 0) -> None:
        m = self.metrics
        with m.lock:
            m.outcomes[outcome] = m.outcomes.get(outcome, 0) + 1
            m.completion_tokens += completion_tokens
            m.latency.observe(time.perf_counter() - self.start)


class Metrics:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.lock = threading.Lock()
        self.outcomes: dict[str, int] = {}
        self.rejected = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.ttft = Histogram(
            "hrpo_time_to_first_token_seconds", "Seconds from a request's arrival to its first token."
        )
        self.itl = Histogram("hrpo_inter_token_latency_seconds", "Seconds between a request's successive steps.")
        self.latency = Histogram("hrpo_request_latency_seconds", "Seconds from a request's arrival to its end.")

    def start(self, prompt_tokens: int) -> Track:
        with self.lock:
            self.prompt_tokens += prompt_tokens
        return Track(self)

    def text(self) -> str:
        s = self.scheduler
        with self.lock:
            lines = ["# HELP hrpo_requests_total Requests answered, by outcome.", "# TYPE hrpo_requests_total counter"]
            for outcome in sorted(set(self.outcomes) | {"ok", "failed", "cancelled"}):
                lines.append(f'hrpo_requests_total{{outcome="{outcome}"}} {self.outcomes.get(outcome, 0)}')
            lines.append(f'hrpo_requests_total{{outcome="rejected"}} {self.rejected}')
            for name, doc, kind, value in (
                ("hrpo_prompt_tokens_total", "Prompt tokens of accepted requests.", "counter", self.prompt_tokens),
                (
                    "hrpo_generation_tokens_total",
                    "Tokens generated for requests answered.",
                    "counter",
                    self.completion_tokens,
                ),
                (
                    "hrpo_dropped_requests_total",
                    "Requests the batch dropped: their client left or the server stopped.",
                    "counter",
                    s.stats["cancelled"],
                ),
                ("hrpo_running_rows", "Rows decoding in the batch now.", "gauge", s.running),
                ("hrpo_waiting_requests", "Requests queued for room in the batch.", "gauge", s.queued),
                ("hrpo_batch_slots", "Rows the batch holds (--max-batch).", "gauge", s.max_batch),
            ):
                lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {value}"]
            for h in (self.ttft, self.itl, self.latency):
                lines += h.lines()
        return "\n".join(lines) + "\n"
