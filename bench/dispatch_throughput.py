"""Benchmark 2: dispatch throughput with thousands of pending jobs on 8 simulated GPUs.

The real dispatcher (jobs.dispatch.dispatch_pending) against the real ledger, with N pending
jobs of mixed sizes (the catalog's needs × 1.5) on 8 simulated 24 GiB GPUs. A pass places
jobs until the GPUs are full; between passes (untimed) the placed jobs go back to pending and
their memory is freed, so every pass faces the same N. Reported per N: placements per second,
the time of a pass that places nothing (a full scan of the queue's head, GPUs full), and how
both change from 1,000 to 10,000 pending (against linear growth).
"""

import argparse
import random
import time
from datetime import timedelta

import common
from django.conf import settings
from django.utils import timezone

GPU_MB = 24 * 1024
GPUS = 8
# Catalog needs (MiB) × inference multiplier 1.5, in the mix of sizes a shared service sees.
MIX = [("tiny.en", 1536, 30), ("base", 1536, 25), ("small", 3072, 20), ("medium", 7680, 15), ("large-v3", 15360, 10)]


def _fill_queue(user, n: int, rng: random.Random) -> None:
    from jobs.models import Job

    Job.objects.filter(state=Job.State.PENDING).delete()
    now = timezone.now()
    sizes = rng.choices([(m, mb) for m, mb, _ in MIX], weights=[w for *_, w in MIX], k=n)
    Job.objects.bulk_create(
        [Job(user=user, model_name=m, memory_mb=mb, queued_at=now - timedelta(milliseconds=n - i))
         for i, (m, mb) in enumerate(sizes)],
        batch_size=2000,
    )


def _free_all() -> None:
    """Untimed: placed jobs back to pending, their reservations released."""
    from gpus.models import Allocation
    from jobs.models import Job

    Allocation.objects.filter(released_at__isnull=True).update(released_at=timezone.now(), release_reason="bench")
    Job.objects.filter(state=Job.State.LOADING).update(state=Job.State.PENDING, device=None, started_at=None)


def _measure(n: int, passes: int) -> dict:
    from jobs.dispatch import dispatch_pending

    placed, seconds = 0, 0.0
    for _ in range(passes):
        _free_all()
        started = time.perf_counter()
        placed += dispatch_pending()
        seconds += time.perf_counter() - started
    full_scans = []
    for _ in range(3):  # GPUs still full from the last pass: the pass only scans and skips
        started = time.perf_counter()
        assert dispatch_pending() == 0
        full_scans.append(time.perf_counter() - started)
    return {"pending": n, "passes": passes, "placed": placed, "placed_per_s": placed / seconds,
            "ms_per_placement": seconds / placed * 1000, "full_scan_ms": sorted(full_scans)[1] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,2000,5000,10000")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--budget-s", type=float, help="start no new size after this long")
    args = parser.parse_args()
    budget = common.Budget(args.budget_s)
    from jobs import dispatch

    with common.bench_database():
        user = common.make_user()
        node = common.make_node("bench-node")
        for index in range(GPUS):
            common.make_device(node, index, total_mb=GPU_MB)
        common.scheduler_set(max_concurrent_tasks=100_000)
        settings.WHISPERHUB_WORKERS = 100_000  # the per-node cap is not what is measured
        rng = random.Random(8)
        rows = []
        for n in [int(x) for x in args.sizes.split(",")]:
            if rows and budget.spent():
                break
            _fill_queue(user, n, rng)
            rows.append(_measure(n, args.passes))
            print(rows[-1], flush=True)
        first, last = rows[0], rows[-1]
        growth = {
            "pending_ratio": last["pending"] / first["pending"],
            "ms_per_placement_ratio": last["ms_per_placement"] / first["ms_per_placement"],
            "full_scan_ratio": last["full_scan_ms"] / first["full_scan_ms"],
        }
        common.write_result("dispatch_throughput", {
            "gpus": GPUS, "gpu_mb": GPU_MB, "safety_factor": 0.8, "scan_limit": dispatch.SCAN_LIMIT,
            "mix": MIX, "rows": rows, "growth": growth,
        })


if __name__ == "__main__":
    main()
