"""Per-type caps on sagas in flight: across workers (max_in_flight) and per worker."""

from __future__ import annotations

import asyncio

import pytest

from sagakit import App, Saga, StepContext, step


class Gauge:
    """Counts sagas inside their step at once, overall and per App."""

    def __init__(self) -> None:
        self.now: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.total_peak = 0

    def saga(self, name: str, tag: str, **caps: int) -> Saga:
        async def hold(ctx: StepContext, data: object) -> str:
            self.now[tag] = self.now.get(tag, 0) + 1
            self.peak[tag] = max(self.peak.get(tag, 0), self.now[tag])
            self.total_peak = max(self.total_peak, sum(self.now.values()))
            await asyncio.sleep(0.03)
            self.now[tag] -= 1
            return tag

        return Saga(name, steps=[step("hold", hold)], **caps)


async def _run_all(apps: list[App], n: int) -> None:
    handles = [await apps[i % len(apps)].start("Capped", {"i": i}) for i in range(n)]
    await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 20)


async def test_cluster_cap_holds_in_one_process(any_url: str) -> None:
    gauge = Gauge()
    app = App(any_url, poll_interval=0.05)
    app.register(gauge.saga("Capped", "a", max_in_flight=2))
    try:
        await _run_all([app], 12)
    finally:
        await app.close()
    assert gauge.total_peak == 2


async def test_cluster_cap_holds_across_two_workers(pg_url: str) -> None:
    gauge = Gauge()
    apps = [App(pg_url, poll_interval=0.05) for _ in range(2)]
    for app, tag in zip(apps, "ab", strict=True):
        app.register(gauge.saga("Capped", tag, max_in_flight=3))
    try:
        await _run_all(apps, 24)
    finally:
        for app in apps:
            await app.close()
    assert gauge.total_peak <= 3
    assert gauge.total_peak >= 2


async def test_per_worker_cap(pg_url: str) -> None:
    gauge = Gauge()
    apps = [App(pg_url, poll_interval=0.05) for _ in range(2)]
    for app, tag in zip(apps, "ab", strict=True):
        app.register(gauge.saga("Capped", tag, max_in_flight_per_worker=1))
    try:
        await _run_all(apps, 12)
    finally:
        for app in apps:
            await app.close()
    assert gauge.peak == {"a": 1, "b": 1}


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_invalid_cap_is_refused(bad: object) -> None:
    from sagakit import InvalidStep

    async def noop(ctx: StepContext, data: object) -> None:
        return None

    with pytest.raises(InvalidStep, match="max_in_flight"):
        Saga("X", steps=[step("a", noop)], max_in_flight=bad)  # type: ignore[arg-type]
