"""Benchmark 3: packing quality on a fixed, seeded trace, in a discrete-event simulation.

Simulated GPUs, simulated run times, real placement code: every policy reserves and releases
through the real ledger (gpus.services) in the benchmark database, and WhisperHub's policy is
the real dispatcher (jobs.dispatch.dispatch_pending, given the simulated clock as `now`, so
that priority aging and the bounded-backfill hold run on simulated time). At each event
(arrivals, completions) the policy places what it can; a placed job runs for its duration,
then its reservation is released.

Policies on the same trace:
  - whisperhub: priority + aging order, skip what does not fit, bounded backfill, seed score
    (default settings; and again with aging_s = 60 s);
  - fifo: the seed's plain FIFO — arrival order, first GPU where the job fits, and the queue
    stops at the first job that fits nowhere (head-of-line blocking);
  - seed_loop: the seed's polling loop as written — arrival order, every job that fits is
    placed (others wait), on the GPU with the best seed score.
Reported: makespan against the lower bound (total memory-seconds ÷ capacity), memory-time
utilisation, and queueing time by model size.

Trace (seeded): model mix from tiny to large-v3 with needs from the seeded catalog × 1.5;
audio lengths log-normal (median 5 min, σ 1, 10 s .. 1 h); run time = load time + audio ×
real-time factor of that model on a datacentre GPU (assumed figures below); 20% high and
20% low priority; arrivals of a Poisson process over the first 30% of the bound, so that the
queue is long and packing, not arrivals, decides the makespan. Live events are switched off
(they cost time, not placement).
"""

import argparse
import heapq
import math
import random
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from unittest import mock

import common
from django.conf import settings
from django.utils import timezone

GPUS_MB = [24 * 1024] * 4 + [48 * 1024] * 2
SAFETY = 0.8
MULTIPLIER = 1.5
# (model, catalog need GB, share of jobs, real-time factor, load seconds) — RTF and load time
# are assumptions for openai-whisper with beam 5 on a datacentre GPU, not measurements.
MODELS = [
    ("tiny.en", 1, 20, 0.01, 1.0),
    ("base", 1, 20, 0.015, 1.5),
    ("small", 2, 20, 0.03, 3.0),
    ("medium", 5, 15, 0.06, 6.0),
    ("turbo", 6, 10, 0.04, 8.0),
    ("large-v3", 10, 15, 0.1, 12.0),
]


@dataclass(order=True)
class TraceJob:
    arrival: float
    index: int
    model: str = field(compare=False)
    mb: int = field(compare=False)
    duration: float = field(compare=False)
    priority: str = field(compare=False)


def make_trace(n: int, seed: int) -> list[TraceJob]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        model, gb, _, rtf, load = rng.choices(MODELS, weights=[m[2] for m in MODELS])[0]
        audio = min(3600.0, max(10.0, rng.lognormvariate(math.log(300), 1.0)))
        priority = rng.choices(["high", "normal", "low"], weights=[20, 60, 20])[0]
        jobs.append(TraceJob(0.0, i, model, math.ceil(gb * 1024 * MULTIPLIER), load + audio * rtf, priority))
    capacity = sum(math.floor(mb * SAFETY) for mb in GPUS_MB)
    window = 0.3 * sum(j.mb * j.duration for j in jobs) / capacity
    t = 0.0
    for job in jobs:  # Poisson arrivals: the trace is shuffled by construction
        t += rng.expovariate(n / window)
        job.arrival = t
    return jobs


# --- policies: each places pending jobs at simulated time `now`; returns nothing ----------------


def policy_whisperhub(now, devices):
    from jobs.dispatch import dispatch_pending

    dispatch_pending(now=now)


def _pending_in_arrival_order():
    from jobs.models import Job

    return list(Job.objects.filter(state=Job.State.PENDING).order_by("queued_at", "id"))


def _mark_placed(job, allocation) -> None:
    from jobs.models import Job

    Job.objects.filter(id=job.id, state=Job.State.PENDING).update(
        state=Job.State.LOADING, attempt=allocation.attempt, device_id=allocation.device_id)


def policy_fifo(now, devices):
    from gpus.services import allocation_reserve_first_fit

    ids = [d.id for d in devices]
    for job in _pending_in_arrival_order():
        allocation = allocation_reserve_first_fit(device_ids=ids, mb=job.memory_mb, job_id=job.id, attempt=job.attempt + 1)
        if allocation is None:
            return  # head-of-line blocking: nothing behind the first job that does not fit
        _mark_placed(job, allocation)


def policy_seed_loop(now, devices):
    from gpus.services import allocation_reserve, memory_figures
    from jobs.dispatch import device_score

    figures = memory_figures([d.id for d in devices])  # one read per pass, kept current below
    for job in _pending_in_arrival_order():
        fitting = [d for d in devices if figures[d.id].available_mb >= job.memory_mb]
        if not fitting:
            continue
        best = max(fitting, key=lambda d: (device_score(d, figures[d.id]), -d.id))
        _mark_placed(job, allocation_reserve(device_id=best.id, mb=job.memory_mb, job_id=job.id, attempt=job.attempt + 1))
        old = figures[best.id]
        figures[best.id] = replace(old, allocated_mb=old.allocated_mb + job.memory_mb,
                                   available_mb=old.available_mb - job.memory_mb)


# name: (policy, scheduler settings it runs with). The aging 60 s variant shows the default's
# trade-off: a large job that fits nowhere is only protected (GPUs held for it) after aging_s.
POLICIES = {
    "whisperhub": (policy_whisperhub, {}),
    "whisperhub_aging_60s": (policy_whisperhub, {"aging_s": 60}),
    "fifo": (policy_fifo, {}),
    "seed_loop": (policy_seed_loop, {}),
}


# --- the simulation ------------------------------------------------------------------------------


def _reset(user):
    from gpus.models import Allocation, Device, Node
    from jobs.models import Job

    Allocation.objects.all().delete()
    Job.objects.all().delete()
    Device.objects.all().delete()
    Node.objects.all().delete()
    node = common.make_node("sim")
    return [common.make_device(node, i, total_mb=mb, safety_factor=SAFETY) for i, mb in enumerate(GPUS_MB)]


def simulate(policy_name: str, trace: list[TraceJob], user) -> dict:
    from gpus.models import Allocation
    from gpus.services import allocation_release
    from jobs.models import Job

    from jobs.models import SchedulerSettings

    devices = _reset(user)
    policy, overrides = POLICIES[policy_name]
    defaults = {f: SchedulerSettings._meta.get_field(f).default for f in ("aging_s",)}
    common.scheduler_set(**dict(defaults, **overrides))
    epoch = timezone.now()
    arrivals = sorted(trace)
    by_job_id, running, completions = {}, set(), []  # completions: heap of (end, job id)
    started_at, next_arrival = {}, 0
    wall = time.perf_counter()
    while next_arrival < len(arrivals) or completions:
        now_s = min(arrivals[next_arrival].arrival if next_arrival < len(arrivals) else math.inf,
                    completions[0][0] if completions else math.inf)
        while completions and completions[0][0] <= now_s:
            _, job_id = heapq.heappop(completions)
            for allocation_id in Allocation.objects.filter(job_id=job_id, released_at__isnull=True).values_list("id", flat=True):
                allocation_release(allocation_id=allocation_id, reason="completed")
            Job.objects.filter(id=job_id).update(state=Job.State.COMPLETED)
            running.discard(job_id)
        while next_arrival < len(arrivals) and arrivals[next_arrival].arrival <= now_s:
            t = arrivals[next_arrival]
            job = Job.objects.create(user=user, model_name=t.model, memory_mb=t.mb, priority=t.priority,
                                     queued_at=epoch + timedelta(seconds=t.arrival))
            by_job_id[job.id] = t
            next_arrival += 1
        policy(epoch + timedelta(seconds=now_s), devices)
        for job_id in Job.objects.filter(state=Job.State.LOADING).exclude(id__in=running).values_list("id", flat=True):
            running.add(job_id)
            started_at[job_id] = now_s
            heapq.heappush(completions, (now_s + by_job_id[job_id].duration, job_id))
    if len(started_at) != len(trace):
        raise RuntimeError(f"{policy_name}: {len(trace) - len(started_at)} jobs never ran")
    return _metrics(policy_name, trace, by_job_id, started_at, time.perf_counter() - wall)


def _metrics(name, trace, by_job_id, started_at, wall_s) -> dict:
    capacity = sum(math.floor(mb * SAFETY) for mb in GPUS_MB)
    work = sum(t.mb * t.duration for t in trace)
    makespan = max(started_at[j] + by_job_id[j].duration for j in started_at)
    bound = work / capacity
    # Also a lower bound: no job can end before its arrival plus its own run time.
    critical = max(t.arrival + t.duration for t in trace)
    waits, by_priority = {}, {}
    for job_id, start in started_at.items():
        t = by_job_id[job_id]
        waits.setdefault(t.model, []).append(start - t.arrival)
        by_priority.setdefault(t.priority, []).append(start - t.arrival)
    last_id = max(started_at, key=lambda j: started_at[j] + by_job_id[j].duration)
    last = by_job_id[last_id]
    return {
        "policy": name,
        "makespan_s": makespan,
        "bound_s": bound,
        "makespan_over_bound": makespan / bound,
        "critical_path_s": critical,
        "makespan_over_best_bound": makespan / max(bound, critical),
        "memory_time_utilisation": work / (capacity * makespan),
        "wait_s_by_model": {m: {"mean": sum(w) / len(w), "max": max(w)} for m, w in waits.items()},
        "wait_s_by_priority": {p: {"mean": sum(w) / len(w), "max": max(w)} for p, w in by_priority.items()},
        # What set the makespan: the job that finished last.
        "last_job": {"model": last.model, "priority": last.priority, "arrival_s": last.arrival,
                     "start_s": started_at[last_id], "duration_s": last.duration},
        "sim_wall_s": wall_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--budget-s", type=float, help="start no new policy after this long")
    args = parser.parse_args()
    budget = common.Budget(args.budget_s)
    trace = make_trace(args.jobs, args.seed)
    with common.bench_database(), mock.patch("whisperhub.live._schedule", lambda event: None):
        user = common.make_user()
        common.scheduler_set(max_concurrent_tasks=100_000)
        settings.WHISPERHUB_WORKERS = 100_000  # caps are not what is measured
        results = []
        for name in args.policies.split(","):
            if results and budget.spent():
                break
            results.append(simulate(name, trace, user))
            print({k: v for k, v in results[-1].items() if k != "wait_s_by_model"}, flush=True)
        common.write_result("packing", {
            "jobs": args.jobs, "seed": args.seed, "gpus_mb": GPUS_MB, "safety_factor": SAFETY,
            "models": MODELS, "results": results, "goal": {"makespan_over_bound": 1.10},
        })


if __name__ == "__main__":
    main()
