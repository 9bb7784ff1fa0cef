"""gateway/core/cpu.py: the bounded, tenant-fair executor. Orders and counts only (jobs are
held open by events, never timed)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.core.cpu import INLINE_BYTES, CpuPool, offload

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _hold(pool: CpuPool, tenant: str, gate: asyncio.Event, order: list[str]) -> None:
    async with pool.slot(tenant):
        order.append(tenant)
        await gate.wait()


async def test_a_freed_slot_goes_to_the_waiting_tenant_holding_fewest() -> None:
    """acme fills both slots and queues four more; globex arrives after them and is served
    at the first free slot, before acme's queued jobs."""
    pool = CpuPool(2)
    gate = asyncio.Event()
    order: list[str] = []
    acme = [asyncio.create_task(_hold(pool, "acme", gate, order)) for _ in range(6)]
    await asyncio.sleep(0)
    globex = asyncio.create_task(_hold(pool, "globex", gate, order))
    await asyncio.sleep(0)
    assert order == ["acme", "acme"] and pool.waiting() == 5 and pool.busy == 2
    gate.set()
    await asyncio.gather(*acme, globex)
    assert order[2] == "globex"  # the first slot freed
    assert pool.busy == 0 and pool.waiting() == 0


async def test_no_tenant_holds_more_than_an_equal_share_while_others_wait() -> None:
    pool = CpuPool(4)
    gates = {t: asyncio.Event() for t in ("a", "b")}
    order: list[str] = []
    tasks = [asyncio.create_task(_hold(pool, "a", gates["a"], order)) for _ in range(8)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(_hold(pool, "b", gates["b"], order)) for _ in range(8)]
    await asyncio.sleep(0)
    assert pool.held == {"a": 4}
    gates["a"].set()  # a's four finish one by one: each freed slot goes to b until 2 / 2
    for _ in range(20):
        await asyncio.sleep(0)
        if pool.held.get("b", 0) >= 2:
            break
    gates["a"].clear()
    await asyncio.sleep(0)
    assert pool.held["b"] >= 2
    gates["a"].set()
    gates["b"].set()
    await asyncio.gather(*tasks)
    assert pool.busy == 0


async def test_a_cancelled_waiter_leaves_the_queue_and_a_running_job_keeps_its_slot() -> None:
    pool = CpuPool(1)
    release = threading.Event()
    running = asyncio.create_task(pool.run("acme", lambda: release.wait(30)))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(pool.run("globex", lambda: 1))
    await asyncio.sleep(0)
    assert pool.waiting() == 1
    waiter.cancel()
    running.cancel()  # the caller stops waiting; the thread still runs, holding the slot
    await asyncio.sleep(0)
    assert pool.waiting() == 0 and pool.held == {"acme": 1}
    release.set()
    for _ in range(200):
        if pool.busy == 0:
            break
        await asyncio.sleep(0.01)
    assert pool.busy == 0
    assert await pool.run("globex", lambda: 7) == 7


async def test_small_work_runs_inline_and_large_work_on_a_pool_thread() -> None:
    where: list[str] = []

    def job() -> None:
        where.append(threading.current_thread().name)

    await offload("acme", INLINE_BYTES, job)
    await offload("acme", INLINE_BYTES + 1, job)
    assert where[0] == threading.current_thread().name
    assert where[1].startswith("gateway-cpu")


async def test_a_pool_needs_a_worker() -> None:
    with pytest.raises(ValueError):
        CpuPool(0)
