"""A token bucket: the one bandwidth bound, shared by the archive's uploads
(``--archive-rate-limit``) and backup I/O (``--backup-rate-limit``, ``backup/pacing.py``).

``take(n)`` is called with the size of each PUT (or multipart part, or backup chunk) before it
is sent. The bucket holds at most ``burst`` bytes of credit (default: one second's worth) and
refills at ``rate`` bytes per second. A request larger than the credit is let through after the
caller has waited until the credit would cover it: the balance goes negative (a debt) and later
callers wait for it to be repaid. So over any span of ``T`` seconds, the bytes *started* are at
most ``burst + rate * T`` — the bound is on average bandwidth; one request is never split (a
multipart part is the unit, so a large object is smoothed part by part).

The clock and the sleep are seams, so tests drive time without sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._last = clock()
        self._lock = threading.Lock()
        #: Seconds callers have waited in total (for tests and logs).
        self.waited = 0.0

    def take(self, n: int) -> float:
        """Account for ``n`` bytes about to be sent; sleep until the bucket allows it. Returns the
        seconds slept. Thread-safe: the debt is booked under the lock, the sleep outside it."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            # Book the request at once (the balance may go negative: a debt); the caller waits
            # until the balance is back at zero, i.e. until everything booked before it and its own
            # bytes fit within ``rate``. Booking first keeps concurrent callers in order.
            self._tokens -= n
            wait = max(0.0, -self._tokens / self.rate)
            self.waited += wait
        if wait > 0:
            self._sleep(wait)
        return wait
