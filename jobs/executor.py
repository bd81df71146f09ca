"""Run one job attempt inside a q2 worker: load the model, transcribe each file, clean up.

Every write goes through a fenced transition in jobs/services.py (guarded on job id, state
and attempt). When one answers False the job was cancelled or reaped meanwhile, or another
delivery of the same task got there first: this run then stops without touching anything.

CUDA is touched only from here, inside the forked worker, never in the qcluster parent
(DESIGN.md, "django-q2 facts"; docs/EXECUTION.md, "Fork rules").
"""

import logging
import os
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

from django.db import InterfaceError, OperationalError, connection
from django.utils import timezone

from jobs import model_cache, services
from jobs.models import AudioFile, Job, SchedulerSettings, WhisperModel
from jobs.whisper_run import Undecodable, decode_audio, is_out_of_memory, result_for_storage, whisper_hooks

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5  # at most two progress writes per second
# How often the watchdog reads whether the job is still ours (between lease renewals), so a
# cancel stops the model within about this long.
FENCE_POLL_S = 1.0
# A PostgreSQL restart took 10–17 s to recover in the fault tests (docs/RELIABILITY.md); a write
# keeps retrying that long, which is still inside the default 30 s lease.
RECONNECT_WITHIN_S = 20
# Advisory-lock namespace ("WH") for the per-job claim; job ids fit the second int4 key.
CLAIM_NAMESPACE = 0x5748


class Fenced(Exception):
    """The job left the state/attempt this run owns (cancelled, reaped, run elsewhere)."""


class TimedOut(Exception):
    """The job ran past started_at + task_timeout_s."""


def job_run(*, job_id: int, attempt: int) -> str:
    """Run attempt `attempt` of job `job_id`; returns what happened, for q2's result row.

    A database that goes away (a PostgreSQL restart) is not the job's fault: reconnect and try
    again for a while instead of spending one of the job's attempts. The fencing checks make the
    retry safe; a run that had already reached processing finds itself stale and its lease decides.
    """
    deadline = time.monotonic() + RECONNECT_WITHIN_S
    while True:
        try:
            return _job_run(job_id=job_id, attempt=attempt)
        except (OperationalError, InterfaceError):
            if time.monotonic() > deadline:
                raise
            logger.warning("job %s attempt %s: database connection lost; reconnecting", job_id, attempt)
            connection.close()
            time.sleep(1)


def _job_run(*, job_id: int, attempt: int) -> str:
    job = Job.objects.select_related("device").filter(id=job_id, attempt=attempt, state=Job.State.LOADING).first()
    if job is None:
        logger.info("job %s attempt %s: not loading with this attempt any more, nothing to do", job_id, attempt)
        return "stale"
    with _claim(job_id) as claimed:
        if not claimed:
            logger.info("job %s attempt %s: another worker is running it", job_id, attempt)
            return "duplicate"
        return _run_claimed(job)


@contextmanager
def _claim(job_id: int):
    """A session advisory lock: of two deliveries of one task running at once, one proceeds.

    Held on this worker's connection, it vanishes with the process if the worker is killed.
    """
    key = job_id % 2**31
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [CLAIM_NAMESPACE, key])
        claimed = cursor.fetchone()[0]
    try:
        yield claimed
    finally:
        if claimed:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [CLAIM_NAMESPACE, key])


def _run_claimed(job: Job) -> str:
    # Re-read under the claim: a delivery that finished just before may have moved the job on.
    if not Job.objects.filter(id=job.id, attempt=job.attempt, state=Job.State.LOADING).exists():
        return "stale"
    logger.info("job %s attempt %s: running in worker pid %s", job.id, job.attempt, os.getpid())
    conf = SchedulerSettings.load()
    run = Run(job, conf)
    clean = False
    try:
        with Watchdog(job_id=job.id, attempt=job.attempt, heartbeat_s=conf.heartbeat_s) as watchdog:
            run.watchdog = watchdog
            outcome = run.execute()
        clean = True
        return outcome
    except Fenced:
        logger.info("job %s attempt %s: fenced out (cancelled or reaped) while %s; stopped", job.id, job.attempt, run.stage)
        return "fenced"
    except (OperationalError, InterfaceError):
        raise  # the database, not the job: job_run reconnects and tries again
    except TimedOut as exc:
        logger.warning("job %s attempt %s: %s", job.id, job.attempt, exc)
        # The sweep's own rule (started_at + task_timeout_s), applied now rather than at its next
        # pass: the job fails without retry and its memory is freed.
        services.jobs_fail_timed_out()
        return "timed out"
    except Exception as exc:
        oom = is_out_of_memory(exc)
        logger.exception("job %s attempt %s failed%s", job.id, job.attempt, " (out of memory)" if oom else "")
        error = "Out of memory on the device" if oom else f"{type(exc).__name__}: {exc}"
        services.job_attempt_failed(job_id=job.id, attempt=job.attempt, error=error, oom=oom)
        return "failed"
    finally:
        # A run stopped inside whisper may leave hooks on the model (word alignment installs
        # some without try/finally): only a model that finished cleanly stays cached.
        run.release_model(discard=not clean)


class Run:
    """One attempt's stages. Its methods raise Fenced/TimedOut; _run_claimed maps the outcome."""

    def __init__(self, job: Job, conf: SchedulerSettings):
        self.job, self.conf = job, conf
        self.watchdog: Watchdog | None = None
        self.device = model_cache.torch_device(job.device) if job.device else "cpu"
        self.checkpoint = None
        self.stage = "loading"  # for the logs: where a stop happened
        self.deadline = (job.started_at or timezone.now()) + timedelta(seconds=conf.task_timeout_s)

    def execute(self) -> str:
        model, load_seconds = self.load()
        self.report(services.job_start_processing, job_id=self.job.id, attempt=self.job.attempt, load_seconds=load_seconds)
        started = time.monotonic()
        for audio in self.job.files.order_by("position"):
            if audio.state in (AudioFile.State.COMPLETED, AudioFile.State.FAILED):
                continue  # settled by an earlier attempt: results are saved as they come
            self.transcribe_file(model, audio)
        self.stage = "completing"
        self.report(services.job_complete, job_id=self.job.id, attempt=self.job.attempt, transcribe_seconds=time.monotonic() - started)
        return "completed"

    def report(self, transition, **kwargs) -> None:
        """Call a fenced transition; stop the run when it answers False.

        A PostgreSQL restart breaks this thread's connection while whisper runs for minutes
        without touching it; reconnect and retry for a while rather than lose the attempt's work.
        The transition is guarded on (id, state, attempt), so a repeat can't apply twice.
        """
        deadline = time.monotonic() + RECONNECT_WITHIN_S
        while True:
            try:
                ok = transition(**kwargs)
                break
            except (OperationalError, InterfaceError):
                if time.monotonic() > deadline:
                    raise
                logger.warning("job %s: database connection lost; reconnecting", self.job.id)
                connection.close()
                time.sleep(1)
        if not ok:
            raise Fenced()

    def check(self) -> None:
        """Called before every decoder step: stop as soon as the run is no longer ours or overdue."""
        if self.watchdog and self.watchdog.fenced.is_set():
            raise Fenced()
        if timezone.now() > self.deadline:
            raise TimedOut(f"Timed out: the job ran longer than the task timeout ({self.conf.task_timeout_s} s)")

    def load(self):
        wm = WhisperModel.objects.filter(name=self.job.model_name).first()
        if wm is None or not wm.installed:
            raise RuntimeError(f"model {self.job.model_name!r} is not installed on this node")
        self.checkpoint = wm.checkpoint_path
        model, seconds, cached = model_cache.model_get(checkpoint=self.checkpoint, device=self.device)
        logger.info(
            "job %s attempt %s: model %s on %s %s in %.2f s",
            self.job.id, self.job.attempt, wm.name, self.device, "from cache" if cached else "loaded", seconds,
        )
        self.check()
        return model, seconds

    def release_model(self, *, discard: bool) -> None:
        if self.checkpoint is not None:
            model_cache.model_put_back(checkpoint=self.checkpoint, device=self.device, discard=discard)

    def transcribe_file(self, model, audio: AudioFile) -> None:
        self.check()
        ids = dict(job_id=self.job.id, attempt=self.job.attempt, file_id=audio.id)
        self.stage = f"starting file {audio.id}"
        self.report(services.job_report_progress, **ids, file_progress=0.0)
        started = time.monotonic()
        try:
            samples = decode_audio(audio.file.path)
        except Undecodable as exc:
            logger.warning("job %s file %s: %s", self.job.id, audio.id, exc)
            self.report(services.job_file_failed, **ids, error=str(exc))
            return
        reporter = ProgressReporter(self, audio.id)
        with whisper_hooks(model, on_progress=reporter.update, on_step=self.check):
            result = model.transcribe(samples, **self.decode_options())
        self.report(
            services.job_file_completed, **ids, result=result_for_storage(result, samples), seconds=time.monotonic() - started
        )

    def decode_options(self) -> dict:
        job = self.job
        options = dict(
            language=job.language or None,
            task=job.task,
            temperature=job.temperature,
            initial_prompt=job.initial_prompt or None,
            word_timestamps=job.word_timestamps,
            fp16=self.device.startswith("cuda"),
            verbose=None,  # no console output, no bar drawn; whisper_hooks still sees the updates
        )
        if job.temperature == 0:  # whisper ignores beams when sampling
            options["beam_size"] = job.beam_size
        return options


class ProgressReporter:
    """Turns whisper's frame counter into throttled per-file progress writes."""

    def __init__(self, run: Run, file_id: int):
        self.run, self.file_id = run, file_id
        self.last_write = time.monotonic()  # the file's 0 % was just written
        run.stage = f"transcribing file {file_id} at 0%"

    def update(self, fraction: float) -> None:
        self.run.stage = f"transcribing file {self.file_id} at {fraction:.0%}"
        self.run.check()
        now = time.monotonic()
        if now - self.last_write < PROGRESS_INTERVAL_S or fraction >= 1:
            return  # throttled; the file's completion write follows at once
        self.last_write = now
        job = self.run.job
        self.run.report(
            services.job_report_progress, job_id=job.id, attempt=job.attempt, file_id=self.file_id, file_progress=round(fraction, 4)
        )


def job_still_ours(*, job_id: int, attempt: int) -> bool:
    return Job.objects.filter(id=job_id, attempt=attempt, state__in=Job.ACTIVE_STATES).exists()


class Watchdog:
    """A thread beside the run: renews the lease every heartbeat_s and, in between, checks every
    FENCE_POLL_S that the job is still ours. Sets `fenced` when either says no."""

    def __init__(self, *, job_id: int, attempt: int, heartbeat_s: float):
        self.ids = dict(job_id=job_id, attempt=attempt)
        self.heartbeat_s = heartbeat_s
        self.fenced = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"watchdog-job-{job_id}", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        next_beat = 0.0  # the first beat goes at once: the lease was granted at dispatch
        try:
            while not self._stop.is_set():
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.heartbeat_s
                    ours = self._ask(services.job_heartbeat)
                else:
                    ours = self._ask(job_still_ours)
                if not ours:
                    self.fenced.set()
                    return
                self._stop.wait(min(FENCE_POLL_S, self.heartbeat_s))
        finally:
            connection.close()  # this thread's own connection

    def _ask(self, question) -> bool:
        try:
            return question(**self.ids)
        except Exception:  # a database hiccup: a later beat may get through before the lease lapses
            logger.exception("job %s: watchdog query failed", self.ids["job_id"])
            # The closed connection is replaced at the next query. Not knowing is not "fenced":
            # the lease, not one failed query, decides whether this run is still ours.
            connection.close()
            return True
            return True
