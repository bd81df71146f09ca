"""The reservation ledger: formula, grants, refusals, releases, leases, and concurrency."""

import multiprocessing
import queue
import random
import threading
import time
from datetime import timedelta

import pytest
from django.db import connection, connections
from django.utils import timezone

from gpus import services
from gpus.models import Allocation, Device
from gpus.services import AllocationExists, DeviceUnavailable, InsufficientMemory
from jobs.models import Job
from tests import ledger_worker
from tests.gpu_factories import make_device, make_node


@pytest.fixture
def node(db):
    return make_node()


@pytest.fixture
def device(node):
    return make_device(node)


def test_formula_matches_the_seed(node):
    device = make_device(node, total_mb=24576, reserved_mb=2048, safety_factor=0.8)
    services.allocation_reserve(device_id=device.id, mb=3000)
    services.allocation_reserve(device_id=device.id, mb=1000)

    figures = services.memory_figures()[device.id]

    assert figures.allocatable_mb == 18022  # floor((24576 − 2048) × 0.8) = floor(18022.4)
    assert figures.allocated_mb == 4000
    assert figures.available_mb == 14022
    assert figures.usage_percent == round(4000 / 18022 * 100, 1)


def test_a_reservation_that_does_not_fit_is_refused_and_writes_nothing(device):
    with pytest.raises(InsufficientMemory, match="8000 MiB available, 8001 MiB requested"):
        services.allocation_reserve(device_id=device.id, mb=8001)
    assert not Allocation.objects.exists()


def test_release_twice_releases_once(device):
    allocation = services.allocation_reserve(device_id=device.id, mb=100)

    assert services.allocation_release(allocation_id=allocation.id, reason="done") is True
    assert services.allocation_release(allocation_id=allocation.id, reason="again") is False

    allocation.refresh_from_db()
    assert allocation.release_reason == "done"
    assert services.memory_figures()[device.id].allocated_mb == 0


@pytest.mark.parametrize(
    "change, reason",
    [({"enabled": False}, "disabled"), ({"draining": True}, "draining")],
)
def test_disabled_and_draining_devices_are_refused(device, change, reason):
    Device.objects.filter(id=device.id).update(**change)
    with pytest.raises(DeviceUnavailable, match=reason):
        services.allocation_reserve(device_id=device.id, mb=100)
    assert not Allocation.objects.exists()


def test_offline_node_is_refused(db):
    device = make_device(make_node("gone", online=False))
    with pytest.raises(DeviceUnavailable, match="offline"):
        services.allocation_reserve(device_id=device.id, mb=100)


def test_foreign_use_reduces_what_is_handed_out(device):
    Device.objects.filter(id=device.id).update(foreign_used_mb=3000)

    assert services.memory_figures()[device.id].available_mb == 5000  # 10000 × 0.8 − 3000
    with pytest.raises(InsufficientMemory):
        services.allocation_reserve(device_id=device.id, mb=5001)
    services.allocation_reserve(device_id=device.id, mb=5000)


def test_foreign_use_larger_than_the_share_leaves_zero_not_negative(device):
    Device.objects.filter(id=device.id).update(foreign_used_mb=9000)
    figures = services.memory_figures()[device.id]
    assert (figures.allocatable_mb, figures.available_mb, figures.usage_percent) == (0, 0, 0.0)


def test_allocation_rounds_the_share_down_to_whole_mib():
    assert services.allocatable_mb(total_mb=100, reserved_mb=0, safety_factor=0.29, foreign_used_mb=0) == 29
    assert services.allocatable_mb(total_mb=24576, reserved_mb=0, safety_factor=0.8, foreign_used_mb=0) == 19660


def test_first_fit_follows_the_given_preference_order(node):
    small = make_device(node, 0, total_mb=1000)  # 800 allocatable
    large = make_device(node, 1, total_mb=5000)  # 4000 allocatable
    # Locks are taken in id order, but the grant follows the caller's order.
    first = services.allocation_reserve_first_fit(device_ids=[large.id, small.id], mb=700)
    assert first.device_id == large.id

    second = services.allocation_reserve_first_fit(device_ids=[small.id, large.id], mb=700)
    assert second.device_id == small.id

    # small has 100 left: the next one skips it.
    third = services.allocation_reserve_first_fit(device_ids=[small.id, large.id], mb=700)
    assert third.device_id == large.id


def test_first_fit_skips_unavailable_devices_and_returns_none_when_nothing_fits(node):
    draining = make_device(node, 0, total_mb=5000, draining=True)
    usable = make_device(node, 1, total_mb=1000)

    assert services.allocation_reserve_first_fit(device_ids=[draining.id, usable.id], mb=500).device_id == usable.id
    assert services.allocation_reserve_first_fit(device_ids=[draining.id, usable.id], mb=500) is None
    assert services.allocation_reserve_first_fit(device_ids=[], mb=500) is None
    assert Allocation.objects.count() == 1


def test_a_job_holds_one_active_allocation_at_a_time(device, alice):
    job = Job.objects.create(user=alice, model_name="tiny.en")
    first = services.allocation_reserve(device_id=device.id, mb=100, job_id=job.id, attempt=1)

    with pytest.raises(AllocationExists):
        services.allocation_reserve(device_id=device.id, mb=100, job_id=job.id, attempt=2)
    assert Allocation.objects.count() == 1

    services.allocation_release(allocation_id=first.id)
    second = services.allocation_reserve(device_id=device.id, mb=100, job_id=job.id, attempt=2)
    assert second.attempt == 2


def test_non_positive_amounts_are_refused(device):
    with pytest.raises(ValueError, match="positive"):
        services.allocation_reserve(device_id=device.id, mb=0)


def test_unknown_device_is_unavailable(db):
    with pytest.raises(DeviceUnavailable, match="does not exist"):
        services.allocation_reserve(device_id=987654, mb=1)


def test_a_lapsed_lease_is_reaped_and_a_renewed_one_is_kept(device):
    now = timezone.now()
    lapsing = services.allocation_reserve(device_id=device.id, mb=1000, lease_s=60)
    renewed = services.allocation_reserve(device_id=device.id, mb=2000, lease_s=60)

    assert services.allocations_reap_expired(now=now + timedelta(seconds=30)) == []
    assert services.allocation_renew(allocation_id=renewed.id, lease_s=600)

    reaped = services.allocations_reap_expired(now=now + timedelta(seconds=120))

    assert [a.id for a in reaped] == [lapsing.id]
    assert reaped[0].release_reason == "lease expired"
    lapsing.refresh_from_db()
    assert lapsing.released_at is not None and lapsing.release_reason == "lease expired"
    assert services.memory_figures()[device.id].allocated_mb == 2000
    # The worker that lost its lease learns it on its next heartbeat, and its release is a no-op.
    assert services.allocation_renew(allocation_id=lapsing.id, lease_s=60) is False
    assert services.allocation_release(allocation_id=lapsing.id) is False


# --- Concurrency: many connections at once against real PostgreSQL row locks. ---


def hammer_devices(node):
    """Three shared devices small enough that workers contend: 2000, 1200 and 800 MiB allocatable."""
    return [make_device(node, i, total_mb=total) for i, total in enumerate([2500, 1500, 1000])]


class Observer(threading.Thread):
    """Reads the ledger over and over while workers hammer it; records the worst overcommit."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.observations = 0
        self.max_overcommit_mb = 0

    def run(self):
        try:
            while not self.stop.is_set():
                for figures in services.memory_figures().values():
                    self.max_overcommit_mb = max(self.max_overcommit_mb, figures.allocated_mb - figures.allocatable_mb)
                self.observations += 1
        finally:
            connection.close()


def assert_ledger_exact(granted: set[int], released: set[int]):
    """Every grant has its row, every release its mark, and the derived sums match the rows held."""
    assert set(Allocation.objects.values_list("id", flat=True)) == granted
    assert set(Allocation.objects.filter(released_at__isnull=False).values_list("id", flat=True)) == released
    held = Allocation.objects.filter(id__in=granted - released)
    by_device = {}
    for allocation in held:
        by_device[allocation.device_id] = by_device.get(allocation.device_id, 0) + allocation.mb
    for device_id, figures in services.memory_figures().items():
        assert figures.allocated_mb == by_device.get(device_id, 0)
        assert figures.allocated_mb <= figures.allocatable_mb


@pytest.mark.django_db(transaction=True)
def test_sixteen_threads_never_overcommit_and_lose_nothing(capsys):
    devices = hammer_devices(make_node())
    device_ids = [d.id for d in devices]
    threads, iterations = 16, 60
    # Allocations travel between threads, sometimes twice, so releases race on the same row.
    to_release: queue.Queue[int] = queue.Queue()
    lock = threading.Lock()
    granted, released, failures = set(), set(), []
    calls = [0]
    start = threading.Barrier(threads + 1)

    def work(seed):
        rng = random.Random(seed)
        try:
            start.wait()
            for _ in range(iterations):
                mb = rng.choice([100, 200, 300, 500])
                if rng.random() < 0.3:
                    try:
                        allocation = services.allocation_reserve(device_id=rng.choice(device_ids), mb=mb)
                    except InsufficientMemory:
                        allocation = None
                else:
                    allocation = services.allocation_reserve_first_fit(
                        device_ids=rng.sample(device_ids, len(device_ids)), mb=mb
                    )
                done = 1
                if allocation is not None:
                    with lock:
                        granted.add(allocation.id)
                    to_release.put(allocation.id)
                    if rng.random() < 0.2:
                        to_release.put(allocation.id)
                if rng.random() < 0.6:
                    try:
                        allocation_id = to_release.get_nowait()
                    except queue.Empty:
                        pass
                    else:
                        done += 1
                        if services.allocation_release(allocation_id=allocation_id, reason="done"):
                            with lock:
                                assert allocation_id not in released, "released twice"
                                released.add(allocation_id)
                with lock:
                    calls[0] += done
        except Exception as exc:  # surfaced below: an exception in a thread must fail the test
            failures.append(exc)
        finally:
            connection.close()

    observer = Observer()
    workers = [threading.Thread(target=work, args=(seed,)) for seed in range(threads)]
    for thread in workers:
        thread.start()
    observer.start()
    started = time.monotonic()
    start.wait()
    for thread in workers:
        thread.join()
    elapsed = time.monotonic() - started
    observer.stop.set()
    observer.join()

    assert failures == []
    assert observer.observations > 0
    assert observer.max_overcommit_mb <= 0
    assert granted and released and granted - released  # contention, releases, and rows still held
    assert_ledger_exact(granted, released)
    with capsys.disabled():
        print(
            f"\n[ledger threads] {threads} threads, {calls[0]} reserve/release calls in {elapsed:.2f} s "
            f"= {calls[0] / elapsed:.0f}/s; {len(granted)} granted, {len(released)} released, "
            f"{observer.observations} observations, max overcommit {max(0, observer.max_overcommit_mb)} MiB"
        )


@pytest.mark.django_db(transaction=True)
def test_sixteen_processes_never_overcommit_and_lose_nothing(capsys, monkeypatch):
    # Children read settings afresh; on a busy machine their start-up can outlast the default horizon.
    monkeypatch.setenv("WHISPERHUB_NODE_OFFLINE_AFTER", "3600")
    devices = hammer_devices(make_node())
    device_ids = [d.id for d in devices]
    processes, iterations = 16, 40
    test_db_name = connections["default"].settings_dict["NAME"]
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited connection
    manager = context.Manager()
    start = manager.Event()

    observer = Observer()
    with context.Pool(processes) as pool:
        pending = [
            pool.apply_async(ledger_worker.hammer, (test_db_name, device_ids, iterations, seed, start))
            for seed in range(processes)
        ]
        observer.start()
        start.set()  # children that are still starting up go as soon as they are ready
        results = [p.get(timeout=300) for p in pending]
        # Let the children exit normally (not terminate()): pgserver deregisters them at exit.
        pool.close()
        pool.join()
    manager.shutdown()
    observer.stop.set()
    observer.join()

    granted = {i for r in results for i in r["granted"]}
    released = {i for r in results for i in r["released"]}
    assert len({r["pid"] for r in results}) == processes
    assert all(r["granted"] for r in results)  # every process got memory
    assert sum(r["refused"] for r in results) > 0  # and the devices were full at times
    assert observer.max_overcommit_mb <= 0
    assert_ledger_exact(granted, released)
    calls = sum(len(r["granted"]) + r["refused"] + 2 * len(r["released"]) for r in results)
    elapsed = max(r["window"][1] for r in results) - min(r["window"][0] for r in results)
    with capsys.disabled():
        print(
            f"\n[ledger processes] {processes} processes, {calls} reserve/release calls in {elapsed:.2f} s "
            f"= {calls / elapsed:.0f}/s; {len(granted)} granted, {len(released)} released, "
            f"{observer.observations} observations, max overcommit {max(0, observer.max_overcommit_mb)} MiB"
        )


@pytest.mark.django_db(transaction=True)
def test_a_grant_waits_while_another_transaction_holds_the_device_lock():
    device = make_device(make_node())
    holding, release_lock = threading.Event(), threading.Event()
    waiter_pid, outcome = [], []

    def hold_lock():
        try:
            from django.db import transaction

            with transaction.atomic():
                services._lock_devices([device.id])
                holding.set()
                release_lock.wait(timeout=30)
        finally:
            connection.close()

    def reserve():
        try:
            connection.ensure_connection()
            waiter_pid.append(connection.connection.info.backend_pid)
            outcome.append(services.allocation_reserve(device_id=device.id, mb=100))
        finally:
            connection.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    assert holding.wait(timeout=10)
    waiter = threading.Thread(target=reserve)
    waiter.start()
    deadline = time.monotonic() + 10
    with connection.cursor() as cursor:
        while True:
            cursor.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", waiter_pid or [0])
            row = cursor.fetchone()
            if row and row[0] == "Lock":
                break
            assert time.monotonic() < deadline, "the grant never waited on the device row lock"
            time.sleep(0.02)
    assert outcome == []  # it is blocked, not done
    release_lock.set()
    holder.join()
    waiter.join()
    assert outcome and outcome[0].mb == 100
