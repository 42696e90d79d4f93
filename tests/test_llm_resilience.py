"""The circuit breaker and backoff on their own."""

from __future__ import annotations

import random

from bot.llm.resilience import Backoff, CircuitBreaker
from tests.conftest import FakeClock


def test_the_breaker_opens_after_consecutive_failures_and_half_opens_for_one_probe(clock: FakeClock) -> None:
    breaker = CircuitBreaker(threshold=3, cooldown=10, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    breaker.record_success()  # a success resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    assert breaker.retry_after() == 10
    clock.advance(10)
    assert breaker.allow()  # the probe
    assert breaker.state == "half_open" and not breaker.allow()
    breaker.record_abandoned()  # the probe was cancelled: another caller may probe
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow()


def test_backoff_grows_is_capped_and_honours_the_server_delay() -> None:
    backoff = Backoff(base=0.5, cap=4.0)
    rng = random.Random(7)
    delays = [backoff.delay(n, rng=rng) for n in range(1, 8)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(2.0 <= d <= 4.0 for d in delays[3:])
    assert all(3.0 <= backoff.delay(1, 3.0, rng) <= 3.0 + 0.5 / 4 for _ in range(20))
