"""Benchmark 1: dispatch latency, WhisperHub's inline dispatch against the seed's 1 s polling thread.

WhisperHub: each job goes through the real job_create (validation, ffprobe, files, commit);
the commit runs the real dispatcher inline, which reserves through the real ledger and
enqueues the q2 task. Measured from the commit of the submission to
  - the reservation (the ledger's Allocation.created_at, inside the grant transaction),
  - the end of the dispatch (grant committed, task enqueued),
  - the q2 worker starting the task (a pre_execute receiver in bench/qcluster_probe.py).
The job is cancelled just before its task is enqueued (the cancel's duration is subtracted),
so the task starts, finds the job cancelled and exits at once instead of loading a model that
would hold the CPU for the next submissions: the last figure is "worker started", the
executor's few pre-load queries excluded (benchmark 4 times whole jobs).

Seed baseline, same code and database: submissions don't dispatch; a thread runs the same
dispatch pass every second (the seed's TaskScheduler._polling_loop), and starts a thread per
placed job, as the seed's executor does ("worker starts" = that thread's first line).
"""

import argparse
import random
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from unittest import mock

import common
from django.conf import settings
from django.db import connection, transaction

SEED_POLL_S = 1.0
SEED_MEAN_GAP_S = 0.1


def _setup(folder: Path):
    user = common.make_user()
    node = common.local_node()
    # Room for every job of the run: "with free capacity" is the case measured.
    common.make_device(node, 0, total_mb=20_000_000)
    common.install_tiny(preload=False)
    common.scheduler_set(max_concurrent_tasks=100_000)
    settings.WHISPERHUB_WORKERS = 100_000
    return user, common.speak("hello", folder, "hello")


@contextmanager
def _probe_once():
    """Every job uploads the same clip: ffprobe it once. The probe runs before the commit, so
    this shortens the benchmark without touching what it measures."""
    from jobs import services

    real_probe, memo = services.probe_audio, {}

    def probe(path):
        if "info" not in memo:
            memo["info"] = real_probe(path)
        return memo["info"]

    with mock.patch.object(services, "probe_audio", probe):
        yield


def _submit(user, clip, marks: dict):
    """job_create inside an outer block, so that our marks bracket its on-commit dispatch."""
    from jobs.services import job_create

    with transaction.atomic():
        transaction.on_commit(lambda: marks.__setitem__("commit", time.time()))  # runs first
        job = job_create(user=user, files=[common.upload(clip)], model_name="tiny.en")
        transaction.on_commit(lambda: marks.__setitem__("dispatched", time.time()))  # runs last
    return job


def _reserved_at(job_id: int) -> float | None:
    from gpus.models import Allocation

    allocation = Allocation.objects.filter(job_id=job_id).order_by("-id").first()
    return allocation.created_at.timestamp() if allocation else None


def run_whisperhub(user, clip, n: int, folder: Path, budget) -> dict:
    from jobs import dispatch
    from jobs.models import Job
    from jobs.services import job_cancel

    real_enqueue, real_dispatch = dispatch._enqueue, dispatch.dispatch_safely
    marks = {}

    def dispatch_marked():
        marks.setdefault("dispatch_start", time.time())  # the first pass: the one the commit ran
        return real_dispatch()

    def enqueue_after_cancel(job_id, attempt, *args):
        started = time.time()
        job_cancel(job=Job.objects.get(id=job_id))
        marks["cancel_s"] = time.time() - started
        real_enqueue(job_id, attempt, *args)

    starts_file = folder / "task-starts.txt"
    rows = []
    with common.qcluster(2, folder / "qcluster.log", task_starts=starts_file), \
            mock.patch.object(dispatch, "_enqueue", enqueue_after_cancel), \
            mock.patch.object(dispatch, "dispatch_safely", dispatch_marked):
        for _ in range(n):
            if budget.spent(0.7):  # the rest is the seed's
                break
            marks.clear()
            job = _submit(user, clip, marks)
            job.refresh_from_db()
            rows.append(dict(marks, job=job.id, attempt=job.attempt, reserved=_reserved_at(job.id),
                             dispatched=marks["dispatched"] - marks["cancel_s"]))
        deadline = time.time() + 60
        while time.time() < deadline and _count_lines(starts_file) < len(rows):
            time.sleep(0.2)
    starts = {}
    for line in starts_file.read_text().splitlines():
        name, at = line.split()
        starts.setdefault(name, float(at))

    def worker_start(row):
        at = starts.get(f"job-{row['job']}-{row['attempt']}")
        return None if at is None else at - row["cancel_s"]

    return dict(_summarise(rows, worker_start), commit_to_dispatch_start_ms=_ms(rows, lambda r: r["dispatch_start"]),
                dispatch_start_to_reservation_ms=common.percentiles(
                    [(r["reserved"] - r["dispatch_start"]) * 1000 for r in rows]))


def _count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def run_seed(user, clip, n: int, budget) -> dict:
    """The seed's design on the same code: a polling thread every second, a thread per job."""
    from jobs import dispatch
    from jobs.models import Job
    from jobs.services import job_cancel

    started_threads, seen, stop = {}, set(), threading.Event()

    def worker_thread(job_id):
        started_threads[job_id] = time.time()

    def poller():
        try:
            while not stop.is_set():
                dispatch.dispatch_pending()
                for job_id in Job.objects.filter(state=Job.State.LOADING).exclude(id__in=seen).values_list("id", flat=True):
                    seen.add(job_id)
                    threading.Thread(target=worker_thread, args=(job_id,)).start()
                stop.wait(SEED_POLL_S)
        finally:
            connection.close()

    rows = []
    # The seed's submission only queues; its executor is a thread, not a q2 task.
    with mock.patch.object(dispatch, "dispatch_on_commit", lambda: None), \
            mock.patch.object(dispatch, "_enqueue", lambda *args: None):
        thread = threading.Thread(target=poller)
        thread.start()
        try:
            pace = random.Random(1)
            for _ in range(n):
                if budget.spent():
                    break
                marks = {}
                job = _submit(user, clip, marks)
                rows.append({"job": job.id, "commit": marks["commit"]})
                # Spread the arrivals over the polling period, as independent users would.
                time.sleep(pace.uniform(0, 2 * SEED_MEAN_GAP_S))
            deadline = time.time() + 10
            while time.time() < deadline and len(started_threads) < len(rows):
                time.sleep(0.05)
        finally:
            stop.set()
            thread.join()
        for job in Job.objects.filter(state=Job.State.LOADING):
            job_cancel(job=job)
    for row in rows:
        row["reserved"] = _reserved_at(row["job"])
    return _summarise(rows, lambda r: started_threads.get(r["job"]))


def _ms(rows, at) -> dict | None:
    values = [(at(r) - r["commit"]) * 1000 for r in rows if at(r) is not None]
    return common.percentiles(values) if values else None


def _summarise(rows: list[dict], worker_start) -> dict:
    return {"jobs": len(rows), "to_reservation_ms": _ms(rows, lambda r: r["reserved"]),
            "to_dispatch_done_ms": _ms(rows, lambda r: r.get("dispatched")),
            "to_worker_start_ms": _ms(rows, worker_start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--seed-jobs", type=int, default=200)
    parser.add_argument("--budget-s", type=float, help="stop submitting after this long (70%% ours, 30%% seed)")
    args = parser.parse_args()
    budget = common.Budget(args.budget_s)
    with common.bench_database(), TemporaryDirectory() as tmp, _probe_once():
        folder = Path(tmp)
        user, clip = _setup(folder)
        started = time.time()
        ours = run_whisperhub(user, clip, args.jobs, folder, budget)
        ours_s = time.time() - started
        started = time.time()
        seed = run_seed(user, clip, args.seed_jobs, budget)
        seed_s = time.time() - started
        common.write_result("dispatch_latency", {
            "whisperhub": dict(ours, wall_s=ours_s), "seed_polling": dict(seed, wall_s=seed_s, poll_s=SEED_POLL_S),
            "q2_poll_s": settings.Q_CLUSTER["poll"],
            "goal": {"to_reservation_p50_ms": 10, "to_load_start_p50_ms": 250},
        })


if __name__ == "__main__":
    main()
