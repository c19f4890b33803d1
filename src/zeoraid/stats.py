"""Counters and latency histograms of a RAID, for monitoring.

Cheap enough for the commit path: a few additions under a lock. The
metrics endpoint renders them; nothing here knows about HTTP.
"""
import bisect
import threading

#: Upper bounds (seconds) of the latency histogram buckets.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """A cumulative-on-export latency histogram (Prometheus style)."""

    def __init__(self, buckets=BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)   # last: +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, seconds):
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self):
        """[(upper bound or None for +Inf, cumulative count)]"""
        result = []
        running = 0
        for bound, n in zip(self.buckets + (None,), self.counts):
            running += n
            result.append((bound, running))
        return result


class RAIDStats:
    """What a RAID counts: commits, aborts, latencies, degrades."""

    def __init__(self):
        self._lock = threading.Lock()
        self.commits = 0
        self.aborts = 0
        self.conflicts = 0
        self.commit_latency = Histogram()   # tpc_begin .. tpc_finish
        self.vote_latency = Histogram()     # fan-out of tpc_vote
        self.finish_latency = Histogram()   # fan-out of tpc_finish
        self.degrades = {}                  # backend name -> count

    def observe(self, histogram, seconds):
        with self._lock:
            histogram.observe(seconds)

    def add(self, counter, n=1):
        with self._lock:
            setattr(self, counter, getattr(self, counter) + n)

    def degraded(self, backend_name):
        with self._lock:
            self.degrades[backend_name] = \
                self.degrades.get(backend_name, 0) + 1
