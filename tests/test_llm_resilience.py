"""The concurrency gate, single-flight, circuit breaker and backoff on their own."""

from __future__ import annotations

import asyncio
import random

import pytest

from bot.llm.resilience import Backoff, CircuitBreaker, ConcurrencyGate, SingleFlight
from tests.conftest import FakeClock


@pytest.mark.asyncio
async def test_the_gate_admits_waiters_in_arrival_order_and_skips_the_cancelled() -> None:
    gate = ConcurrencyGate(1)
    await gate.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        await gate.acquire()
        order.append(i)
        gate.release()

    tasks = [asyncio.create_task(waiter(i)) for i in range(5)]
    await asyncio.sleep(0)  # one loop pass runs each new task up to its first wait
    assert gate.queued == 5
    tasks[2].cancel()
    gate.release()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 1, 3, 4]
    assert gate.in_flight == 0 and gate.queued == 0
    assert gate.peak_in_flight == 1


@pytest.mark.asyncio
async def test_a_slot_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    gate = ConcurrencyGate(1)
    await gate.acquire()
    first = asyncio.create_task(gate.acquire())
    second = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    assert gate.queued == 2
    gate.release()  # hands the slot to `first`...
    first.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(first, return_exceptions=True)
    await second
    assert gate.in_flight == 1
    gate.release()
    assert gate.in_flight == 0


@pytest.mark.asyncio
async def test_single_flight_cancels_the_shared_call_only_when_every_caller_has_gone() -> None:
    flights: SingleFlight[str] = SingleFlight()
    started = asyncio.Event()
    upstream_cancelled = asyncio.Event()

    async def upstream() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            upstream_cancelled.set()
            raise
        return "never"

    callers = [asyncio.create_task(flights.do("k", upstream)) for _ in range(2)]
    await started.wait()
    callers[0].cancel()
    await asyncio.gather(callers[0], return_exceptions=True)
    assert not upstream_cancelled.is_set()
    callers[1].cancel()
    await asyncio.gather(callers[1], return_exceptions=True)
    await upstream_cancelled.wait()
    assert len(flights) == 0


@pytest.mark.asyncio
async def test_single_flight_shares_errors_and_forgets_finished_keys() -> None:
    flights: SingleFlight[str] = SingleFlight()
    calls = 0

    async def failing() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        raise RuntimeError("upstream broke")

    results = await asyncio.gather(*(flights.do("k", failing) for _ in range(3)), return_exceptions=True)
    assert calls == 1
    assert all(isinstance(r, RuntimeError) for r in results)
    assert len(flights) == 0
    with pytest.raises(RuntimeError):
        await flights.do("k", failing)
    assert calls == 2


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
