"""`manage.py qcluster` that also notes when a worker starts each task (for bench/dispatch_latency.py).

q2's own Task.started is the enqueue time, not the start; its pre_execute signal fires in the
worker just before the task function runs. Receivers connected here are inherited by the
forked workers. Each start is appended to $BENCH_TASK_STARTS as "<task name> <unix time>".
"""

import os
import time

import common  # noqa: F401  (Django set up on the benchmark database given by DATABASE_URL)
from django.core.management import call_command
from django_q.signals import pre_execute

STARTS = os.environ["BENCH_TASK_STARTS"]


def note_start(sender, func, task, **kwargs):
    with open(STARTS, "a") as fh:  # one short line per write: appends from workers don't interleave
        fh.write(f"{task.get('name')} {time.time():.6f}\n")


pre_execute.connect(note_start, dispatch_uid="bench-task-starts")
call_command("qcluster")
