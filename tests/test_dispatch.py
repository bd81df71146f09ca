"""The dispatcher: order with aging, fit and waiting, the placement score, caps, concurrent dispatchers."""

import threading
from collections import Counter
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from django_q.models import OrmQ

from gpus.models import Allocation, Device
from gpus.services import allocation_reserve, memory_figures
from jobs import services
from jobs.dispatch import device_score, dispatch_pending, pending_ordered
from jobs.models import Job, JobEvent, SchedulerSettings
from tests.scheduling import make_device, make_job, make_node, scheduler

State = Job.State


@pytest.fixture(autouse=True)
def _many_workers(settings):
    # The per-node worker cap has its own test; elsewhere it must not be what limits placement.
    settings.WHISPERHUB_WORKERS = 100


@pytest.fixture
def node(db):
    return make_node()


def state_of(job) -> str:
    return Job.objects.values_list("state", flat=True).get(id=job.id)


def placed_in_order(jobs) -> list:
    """Dispatch one job at a time (cap 1, each finishing before the next) and return the order."""
    scheduler(max_concurrent_tasks=1)
    order = []
    for _ in jobs:
        assert dispatch_pending() == 1
        job = Job.objects.get(state=State.LOADING)
        order.append(job)
        services.job_start_processing(job_id=job.id, attempt=job.attempt, load_seconds=0)
        services.job_complete(job_id=job.id, attempt=job.attempt, transcribe_seconds=0)
    return order


# --- Order ---


def test_higher_priority_goes_first_then_the_longer_wait(alice, node):
    make_device(node)
    low = make_job(alice, priority=Job.Priority.LOW, waited_s=30)
    old_normal = make_job(alice, waited_s=20)
    new_normal = make_job(alice, waited_s=10)
    high = make_job(alice, priority=Job.Priority.HIGH, waited_s=0)

    assert placed_in_order([low, old_normal, new_normal, high]) == [high, old_normal, new_normal, low]


def test_aging_lifts_a_waiting_low_job_past_a_stream_of_high_ones(alice, node):
    settings = scheduler(aging_s=300)
    now = timezone.now()
    starving = make_job(alice, priority=Job.Priority.LOW, waited_s=2 * 300 + 1)  # 1 + 2 = 3, like high
    patient = make_job(alice, priority=Job.Priority.LOW, waited_s=300 + 1)  # 1 + 1 = 2
    fresh_high = make_job(alice, priority=Job.Priority.HIGH)

    ordered = list(pending_ordered(now=now, scheduler=settings))

    assert ordered == [starving, fresh_high, patient]
    assert [job.effective_weight for job in ordered] == [3, 3, 2]


def test_a_retried_job_waits_out_its_backoff(alice, node):
    make_device(node)
    job = make_job(alice, not_before=timezone.now() + timedelta(seconds=30))

    assert dispatch_pending() == 0
    assert dispatch_pending(now=timezone.now() + timedelta(seconds=31)) == 1


# --- Fit ---


def test_a_job_that_does_not_fit_waits_and_runs_once_memory_is_released(alice, node, django_capture_on_commit_callbacks):
    device = make_device(node, total_mb=2000)
    first = make_job(alice, memory_mb=1500, waited_s=2)
    second = make_job(alice, memory_mb=1500, waited_s=1)

    assert dispatch_pending() == 1
    assert (state_of(first), state_of(second)) == (State.LOADING, State.PENDING)
    assert dispatch_pending() == 0

    with django_capture_on_commit_callbacks(execute=True):  # job end dispatches after its commit
        services.job_start_processing(job_id=first.id, attempt=1, load_seconds=0)
        services.job_complete(job_id=first.id, attempt=1, transcribe_seconds=0)

    assert state_of(second) == State.LOADING
    assert Allocation.objects.get(job=second, released_at__isnull=True).device == device


def test_a_big_job_does_not_block_smaller_ones_until_it_has_waited_an_aging_window(alice, node):
    scheduler(aging_s=300)
    make_device(node, total_mb=4000)
    blocker = make_job(alice, memory_mb=2000, waited_s=1000)
    dispatch_pending()
    big = make_job(alice, memory_mb=3000, priority=Job.Priority.HIGH, waited_s=10)
    small = make_job(alice, memory_mb=1500, waited_s=5)

    assert dispatch_pending() == 1  # the small job backfills beside the blocker
    assert (state_of(big), state_of(small)) == (State.PENDING, State.LOADING)

    services.job_attempt_failed(job_id=small.id, attempt=1, error="x")
    Job.objects.filter(id=small.id).update(not_before=None, queued_at=timezone.now())
    Job.objects.filter(id=big.id).update(queued_at=timezone.now() - timedelta(seconds=301))

    assert dispatch_pending() == 0  # the device is now held for the big job: no more backfill
    services.job_start_processing(job_id=blocker.id, attempt=1, load_seconds=0)
    services.job_complete(job_id=blocker.id, attempt=1, transcribe_seconds=0)
    assert dispatch_pending() == 1
    assert (state_of(big), state_of(small)) == (State.LOADING, State.PENDING)


def test_only_enabled_undrained_devices_on_online_nodes_are_used(alice, node):
    make_device(node, 0, enabled=False)
    make_device(node, 1, draining=True)
    make_device(make_node("gone", online=False), 0)
    job = make_job(alice)

    assert dispatch_pending() == 0
    usable = make_device(node, 2)
    assert dispatch_pending() == 1
    assert Job.objects.get(id=job.id).device == usable


def test_a_job_the_ledger_refuses_does_not_stall_the_queue(alice, node):
    make_device(node)
    broken = make_job(alice, memory_mb=0, priority=Job.Priority.HIGH)  # written by hand, not by job_create
    job = make_job(alice)

    assert dispatch_pending() == 1
    assert (state_of(broken), state_of(job)) == (State.PENDING, State.LOADING)


# --- Placement score ---


def test_the_score_weighs_free_memory_idleness_temperature_and_device_kind(node):
    device = make_device(node, total_mb=10_000, utilization_pct=25, temperature_c=42.5)
    figures = memory_figures()[device.id]

    # 0.4 × 1 (all free) + 0.3 × 0.75 + 0.2 × 0.5 + 0.1 × 0.5 (simulated)
    assert device_score(device, figures) == pytest.approx(0.4 + 0.225 + 0.1 + 0.05)


@pytest.mark.parametrize(
    "telemetry, expected",
    [
        ({"a": dict(temperature_c=80), "b": dict(temperature_c=40), "c": dict(temperature_c=60)}, "b"),
        ({"a": dict(utilization_pct=90), "b": dict(utilization_pct=50), "c": dict(utilization_pct=5)}, "c"),
    ],
)
def test_placement_follows_the_score(alice, node, telemetry, expected):
    devices = {name: make_device(node, index, **fields) for index, (name, fields) in enumerate(telemetry.items())}
    job = make_job(alice)

    dispatch_pending()

    assert Job.objects.get(id=job.id).device == devices[expected]


def test_placement_prefers_the_device_with_more_free_memory_and_a_gpu_over_the_cpu(alice, node):
    busy = make_device(node, 0, total_mb=10_000)
    free = make_device(node, 1, total_mb=10_000)
    make_device(node, 2, total_mb=10_000, kind=Device.Kind.CPU)
    allocation_reserve(device_id=busy.id, mb=6000)
    job = make_job(alice)

    dispatch_pending()

    assert Job.objects.get(id=job.id).device == free


# --- Caps ---


def test_at_most_max_concurrent_tasks_hold_devices(alice, node):
    scheduler(max_concurrent_tasks=2)
    make_device(node, 0)
    make_device(node, 1)
    jobs = [make_job(alice, memory_mb=100) for _ in range(4)]

    assert dispatch_pending() == 2
    assert dispatch_pending() == 0
    assert Counter(state_of(job) for job in jobs) == {State.LOADING: 2, State.PENDING: 2}


def test_a_node_gets_no_more_tasks_than_it_has_workers(alice, node, settings):
    settings.WHISPERHUB_WORKERS = 1
    make_device(node, 0)
    make_device(node, 1)
    other = make_device(make_node("node-b"), 0)
    for _ in range(3):
        make_job(alice, memory_mb=100)

    assert dispatch_pending() == 2

    assert sorted(Job.objects.filter(state=State.LOADING).values_list("device__node__name", flat=True)) == [
        "node-a",
        "node-b",
    ]
    assert Job.objects.filter(device=other).count() == 1


def test_a_placement_is_enqueued_on_its_node_cluster_after_commit(alice, node, django_capture_on_commit_callbacks):
    scheduler(task_timeout_s=100)
    make_device(node)
    job = make_job(alice)

    with django_capture_on_commit_callbacks(execute=True):
        dispatch_pending()

    task = OrmQ.objects.get(key="whisperhub-node-a").task
    assert (task["func"], task["args"], task["name"], task["timeout"]) == ("jobs.tasks.run_job", (job.id, 1), f"job-{job.id}-1", 130)
    event = JobEvent.objects.get(job=job, to_state=State.LOADING)
    assert event.attempt == 1 and event.device_id == Job.objects.get(id=job.id).device_id


# --- Concurrency ---


@pytest.mark.django_db(transaction=True)
def test_concurrent_dispatchers_never_overcommit_nor_place_a_job_twice(alice):
    scheduler(max_concurrent_tasks=6)
    node = make_node()
    devices = [make_device(node, index, total_mb=5000) for index in range(3)]
    jobs = [make_job(alice, memory_mb=size) for size in [700, 1100, 1500, 2300] * 6]
    start = threading.Barrier(8)
    errors = []

    def dispatcher():
        try:
            start.wait()
            for _ in range(5):
                dispatch_pending()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=dispatcher) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    figures = memory_figures()
    for device in devices:
        assert figures[device.id].allocated_mb <= figures[device.id].allocatable_mb
    active = Allocation.objects.filter(released_at__isnull=True)
    running = Job.objects.filter(state=State.LOADING)
    assert running.count() == active.count() <= 6
    assert set(running.values_list("attempt", flat=True)) == {1}
    assert set(active.values_list("job_id", flat=True)) == set(running.values_list("id", flat=True))
    placements = Counter(JobEvent.objects.filter(to_state=State.LOADING).values_list("job_id", flat=True))
    assert set(placements.values()) == {1}
    # The dispatchers left nothing that could still fit on a device.
    smallest_waiting = min(job.memory_mb for job in Job.objects.filter(state=State.PENDING))
    assert running.count() == 6 or all(f.available_mb < smallest_waiting for f in figures.values())
    assert len(jobs) == running.count() + Job.objects.filter(state=State.PENDING).count()
