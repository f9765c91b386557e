"""Run times of workflow runs: measured exactly, learned per workflow, kept in the store.

* :func:`run_seconds` turns what was seen of one run into its run time. Coze's ``run_histories``
  gives ``create_time`` and ``update_time`` (Unix seconds) for an ended run: its start and its
  end, each truncated to the second, so their difference is the run time within one second
  either way (for sub-second runs it is 0 or 1, so the poll bounds below matter there). What the worker saw bounds it too: the run started after the submit went out and
  before its answer came back, and ended after the last poll that saw it ``Running`` was sent and
  before the answer that saw it end. Only differences of times on the same clock are used, so a
  skew between Coze's clock and ours does not matter. Without Coze's times (an older answer, a
  gateway that strips them) the midpoint of the poll bounds is used, which is biased when the
  first poll already sees the end; with them it is not.
* :class:`RunTimeBook` holds the last :data:`KEEP` run times of each workflow, loads them from
  the store the first time a workflow is seen (so a new process, a restarted worker or a second
  batch starts from what earlier ones learned) and fits a :class:`RunTimeModel` from them.
* :class:`RunTimeModel` places polls where runs are likely to end (see its docstring).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable, Iterable

__all__ = ["run_seconds", "RunTimeModel", "RunTimeBook", "KEEP"]

#: Run times kept per workflow, in memory and in the store.
KEEP = 200


def run_seconds(*, create_time: float | None, update_time: float | None,
                submit_sent: float | None, submit_answered: float,
                running_sent: float | None, end_seen: float) -> float | None:
    """The run time of one ended run, in seconds (at least 1 ms); None when nothing bounds it
    from above (no Coze times and no submit time: a run resumed after a restart).

    ``create_time`` / ``update_time``: Coze's start and end of the run (whole seconds, None when
    missing). The rest are the worker's own clock: when the submit went out (None when unknown,
    e.g. a run resumed after a restart) and when its answer came back; when the last poll that
    saw the run ``Running`` went out (None when the first poll already saw the end); when the
    answer that saw the end came back.
    """
    lo = max(0.0, running_sent - submit_answered) if running_sent is not None else 0.0
    hi = end_seen - submit_sent if submit_sent is not None else math.inf
    hi = max(lo, hi)
    if create_time is not None and update_time is not None and update_time >= create_time:
        k = float(update_time) - float(create_time)
        # start in [C, C+1), end in [U, U+1), each truncation uniform: the run time is k plus
        # the difference of two uniforms, triangular on (k - 1, k + 1); keep the part the
        # polls allow and take its mean
        c_lo, c_hi = max(lo, k - 1.0), min(hi, k + 1.0)
        if c_lo <= c_hi:
            return max(1e-3, _triangle_mean(k, c_lo, c_hi))
        # Coze's times contradict what was seen (a clock jump at Coze?): trust the polls
    if math.isinf(hi):
        return None
    return max(1e-3, (lo + hi) / 2)


def _triangle_mean(k: float, a: float, b: float) -> float:
    """Mean of the density ``1 - |x - k|`` restricted to ``[a, b]`` (inside ``(k-1, k+1)``)."""
    if b - a < 1e-9:
        return (a + b) / 2
    mass = moment = 0.0
    for lo, hi, alpha, beta in ((a, min(b, k), 1.0 - k, 1.0), (max(a, k), b, 1.0 + k, -1.0)):
        if hi > lo:     # the density is alpha + beta * x on this side of the peak
            mass += alpha * (hi - lo) + beta * (hi * hi - lo * lo) / 2
            moment += alpha * (hi * hi - lo * lo) / 2 + beta * (hi ** 3 - lo ** 3) / 3
    return moment / mass if mass > 1e-12 else (a + b) / 2


class RunTimeModel:
    """Where to poll a run, given run times seen so far (a lognormal fit).

    Polling is an inspection problem: a poll costs one call, and a run that ended ``d`` seconds
    before the next poll wastes ``d`` seconds. With the hazard rate ``h(t)`` of the run-time
    distribution (the chance per second that a run still going at ``t`` ends now), the interval
    that minimises ``delay + c * polls`` near ``t`` is ``sqrt(2c / h(t))`` (Keller, 1974): no polls
    while runs are unlikely to end, dense ones where they usually end. With it the expected delay
    is ``sqrt(c/2) * I`` and the expected number of polls ``I / sqrt(2c)``, where
    ``I = integral of sqrt(f(t) * S(t)) dt``; ``c`` is chosen so that the delay is ``target`` of the
    mean run time, or larger when the polls would exceed ``max_poll_rate`` per run per second.
    """

    __slots__ = ("mu", "sigma", "mean", "median", "c", "target", "early")

    def __init__(self, mu: float, sigma: float, target: float,
                 max_poll_rate: "float | Callable[[float], float]") -> None:
        self.mu, self.sigma = mu, sigma
        self.mean = math.exp(mu + sigma * sigma / 2)
        self.median = math.exp(mu)
        if callable(max_poll_rate):   # the rate may depend on the mean run time
            max_poll_rate = max_poll_rate(self.mean)
        integral = math.sqrt(sigma * math.exp(mu)) * _lognormal_i(sigma)
        c = 2 * (target * self.mean / integral) ** 2
        if max_poll_rate > 0:   # expected polls per run: integral / sqrt(2c)
            max_polls = max_poll_rate * self.mean
            c = max(c, (integral / max_polls) ** 2 / 2)
        self.c = c
        self.target = math.sqrt(c / 2) * integral / self.mean   # >= target when QPS-bound
        self.early = math.exp(mu - 2.6 * sigma)   # about the 0.5th percentile

    @classmethod
    def fit(cls, durations: Iterable[float], target: float,
            max_poll_rate: "float | Callable[[float], float]" = 0.0) -> "RunTimeModel":
        logs = [math.log(max(1e-3, d)) for d in durations]
        if not logs:
            raise ValueError("no run times to fit")
        mu = math.fsum(logs) / len(logs)
        var = math.fsum((x - mu) ** 2 for x in logs) / max(1, len(logs) - 1)
        return cls(mu, max(0.05, math.sqrt(var)), target, max_poll_rate)

    @property
    def floor(self) -> float:
        """The shortest sensible gap between polls for these runs: ``target`` of the median."""
        return self.target * self.median

    def hazard(self, t: float) -> float:
        if t <= 0:
            return 0.0
        z = (math.log(t) - self.mu) / self.sigma
        survive = 0.5 * math.erfc(z / _SQRT2)
        if survive < 1e-300:
            return z / (self.sigma * t)
        return math.exp(-0.5 * z * z) / (_SQRT2PI * survive * self.sigma * t)

    def next_delay(self, elapsed: float, floor: float, cap: float) -> float:
        """The smallest ``d`` in ``[floor, cap]`` with ``d**2 * h(elapsed + d) >= 2c``."""
        goal = 2 * self.c
        if floor >= cap or floor * floor * self.hazard(elapsed + floor) >= goal:
            return min(floor, cap)
        lo = floor
        while lo < cap:
            hi = min(cap, lo * 1.3)
            if hi * hi * self.hazard(elapsed + hi) >= goal:
                for _ in range(10):
                    mid = (lo + hi) / 2
                    if mid * mid * self.hazard(elapsed + mid) >= goal:
                        hi = mid
                    else:
                        lo = mid
                return hi
            lo = hi
        return cap


class RunTimeBook:
    """The last :data:`KEEP` run times of each workflow, and a model fitted from them.

    ``load(workflow_id)`` returns the stored run times, newest last (the book calls it once per
    workflow, the first time it is asked about it). Adding a run time here does not store it:
    the caller writes it with :func:`storage.runtimes.record`.
    """

    def __init__(self, load, *, keep: int = KEEP) -> None:
        self._load = load
        self.keep = keep
        self._samples: dict[str, deque[float]] = {}
        self._added: dict[str, int] = {}       # run times added since the book was created
        self._models: dict[str, tuple[int, RunTimeModel]] = {}

    def samples(self, workflow_id: str) -> deque[float]:
        got = self._samples.get(workflow_id)
        if got is None:
            got = self._samples[workflow_id] = deque(
                (max(1e-3, float(s)) for s in self._load(workflow_id)), maxlen=self.keep)
            self._added[workflow_id] = 0
        return got

    def add(self, workflow_id: str, seconds: float) -> None:
        self.samples(workflow_id).append(max(1e-3, float(seconds)))
        self._added[workflow_id] += 1

    def model(self, workflow_id: str, *, target: float,
              max_poll_rate: "float | Callable[[float], float]",
              min_samples: int) -> RunTimeModel | None:
        """The fitted model (None below ``min_samples`` run times); refitted after every ~12 %
        of new run times (cheap, not per poll)."""
        samples = self.samples(workflow_id)
        n = len(samples)
        if n < min_samples:
            return None
        added = self._added[workflow_id]
        cached = self._models.get(workflow_id)
        if cached is None or added - cached[0] >= max(4, n // 8):
            cached = (added, RunTimeModel.fit(samples, target, max_poll_rate))
            self._models[workflow_id] = cached
        return cached[1]


_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


def _lognormal_i(sigma: float, _cache: dict[float, float] = {}) -> float:
    """``integral of sqrt(exp(sigma z) * phi(z) * Q(z)) dz`` (the lognormal's I, unscaled)."""
    key = round(sigma, 3)
    value = _cache.get(key)
    if value is None:
        step, total = 0.05, 0.0
        for i in range(-200, 201):
            z = i * step
            total += math.sqrt(math.exp(key * z - 0.5 * z * z) / _SQRT2PI
                               * 0.5 * math.erfc(z / _SQRT2))
        value = _cache[key] = total * step
        if len(_cache) > 4096:
            _cache.clear()
    return value
