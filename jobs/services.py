"""Job lifecycle: submission, the transitions a running task reports, cancel, retry, delete, recovery.

Every transition is a guarded UPDATE on (id, state, attempt) and is recorded as a JobEvent.
`attempt` is the fencing token: dispatch raises it each time it places the job, so a task that
q2 delivered twice, or that outlived a reaped lease, names an attempt the job no longer has
and every call it makes returns False without changing anything.

Lock order, shared with jobs/dispatch.py and gpus/services.py, so no two transactions can
wait on each other in a cycle: scheduler settings row → job row → device rows → allocation rows.
The ledger's reaper locks device rows in its own transaction; the jobs it reaps are handled
after it committed, never inside it.
"""

import logging
import math
import os
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files.storage import default_storage
from django.core.validators import URLValidator
from django.db import transaction
from django.db.models import Exists, F, OuterRef
from django.db.models.functions import Greatest
from django.utils import timezone

from gpus.models import Allocation, Device
from gpus.services import allocatable_mb, allocation_release, allocation_renew, allocations_reap_expired
from jobs import dispatch
from jobs.audio import AudioProbeError, probe_audio
from jobs.models import AudioFile, Job, JobEvent, SchedulerSettings, WhisperModel
from jobs.tasks_callbacks import job_callback_schedule
from whisperhub import live

logger = logging.getLogger(__name__)

# Out of memory says the estimate was wrong, not that the job is bad: it gets its own budget,
# and each time the reservation grows by OOM_GROWTH (capped at the largest device).
OOM_RETRY_LIMIT = 3
OOM_GROWTH = 1.5
# A failed attempt waits RETRY_BACKOFF_S × 2^(failures − 1), at most RETRY_BACKOFF_MAX_S.
RETRY_BACKOFF_S = 5
RETRY_BACKOFF_MAX_S = 300
MAX_BEAM_SIZE = 20
MAX_PROMPT_CHARS = 2000
ERROR_CHARS = 2000

State = Job.State


class JobInputError(Exception):
    """A submission the user must change; the API answers 400 {field: message}."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class JobStateError(Exception):
    """The job's state does not allow this action (e.g. cancelling a finished job); the API answers 409."""


# --- Submission ---------------------------------------------------------------------------------


def job_create(
    *,
    user,
    files,
    model_name: str,
    language: str = "",
    task: str = Job.Task.TRANSCRIBE,
    priority: str = Job.Priority.NORMAL,
    temperature: float = 0.0,
    beam_size: int = 5,
    initial_prompt: str = "",
    word_timestamps: bool = False,
    output_formats=None,
    callback_url: str = "",
    name: str = "",
    source: str = Job.Source.PORTAL,
) -> Job:
    """Validate, store the files, commit; then (on commit) dispatch. On error nothing is left behind."""
    model = _model_check(model_name)
    language = _language_check(language, model)
    _options_check(
        model=model,
        task=task,
        priority=priority,
        temperature=temperature,
        beam_size=beam_size,
        initial_prompt=initial_prompt,
        callback_url=callback_url,
        name=name,
        source=source,
    )
    output_formats = _formats_check(output_formats)
    memory_mb = memory_need_mb(model=model, scheduler=SchedulerSettings.load())
    _fit_check(model, memory_mb)
    _files_check(files)

    stored: list[str] = []
    try:
        with transaction.atomic():
            job = Job.objects.create(
                user=user,
                name=name,
                source=source,
                model_name=model.name,
                language=language,
                task=task,
                priority=priority,
                temperature=temperature,
                beam_size=beam_size,
                initial_prompt=initial_prompt,
                word_timestamps=word_timestamps,
                output_formats=output_formats,
                callback_url=callback_url,
                memory_mb=memory_mb,
            )
            for position, upload in enumerate(files):
                _audio_file_store(job, position, upload, stored)
            _event(job.id, "", State.PENDING, 0, message=f"submitted: {len(files)} file(s), {memory_mb} MiB needed")
            # Registered first, so on commit the reservation is made before the live events go out.
            dispatch.dispatch_on_commit()
            live.job_changed(job.id, user_id=user.id)
            live.queue_changed()
    except BaseException:
        # The rows roll back by themselves; the files written meanwhile do not.
        _files_remove(stored)
        raise
    return job


def memory_need_mb(*, model: WhisperModel, scheduler: SchedulerSettings) -> int:
    """The reservation a job of `model` makes: the model's need × the inference multiplier."""
    return math.ceil(model.memory_mb * scheduler.inference_multiplier)


def _model_check(model_name: str) -> WhisperModel:
    model = WhisperModel.objects.filter(name=model_name, enabled=True).first()
    if model is None:
        choices = ", ".join(WhisperModel.objects.filter(enabled=True).values_list("name", flat=True)) or "none"
        raise JobInputError("model", f'Unknown model "{model_name}". Available: {choices}.')
    if not model.installed:
        raise JobInputError("model", f'Model "{model.name}" is not installed on this server.')
    return model


def _language_check(language: str, model: WhisperModel) -> str:
    from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

    language = (language or "").strip().lower()
    if language in ("", "auto"):
        return ""
    code = language if language in LANGUAGES else TO_LANGUAGE_CODE.get(language)
    if code is None:
        raise JobInputError("language", f'Unknown language "{language}": use a code such as "en" or "de", or leave it empty.')
    if model.english_only and code != "en":
        raise JobInputError("language", f'Model "{model.name}" understands English only.')
    return code


def _options_check(*, model, task, priority, temperature, beam_size, initial_prompt, callback_url, name, source):
    if task not in Job.Task.values:
        raise JobInputError("task", f'Task must be one of: {", ".join(Job.Task.values)}.')
    if task == Job.Task.TRANSLATE and model.english_only:
        raise JobInputError("task", f'Model "{model.name}" is English-only and cannot translate; choose a multilingual model.')
    if priority not in Job.Priority.values:
        raise JobInputError("priority", f'Priority must be one of: {", ".join(Job.Priority.values)}.')
    if not 0.0 <= float(temperature) <= 1.0:
        raise JobInputError("temperature", "Temperature must be between 0 and 1.")
    if not 1 <= int(beam_size) <= MAX_BEAM_SIZE:
        raise JobInputError("beam_size", f"Beam size must be between 1 and {MAX_BEAM_SIZE}.")
    if len(initial_prompt) > MAX_PROMPT_CHARS:
        raise JobInputError("initial_prompt", f"The initial prompt is limited to {MAX_PROMPT_CHARS} characters.")
    if len(name) > Job._meta.get_field("name").max_length:
        raise JobInputError("name", "The name is too long.")
    if source not in Job.Source.values:
        raise JobInputError("source", f'Source must be one of: {", ".join(Job.Source.values)}.')
    if callback_url:
        try:
            URLValidator(schemes=["http", "https"])(callback_url)
        except ValidationError:
            raise JobInputError("callback_url", "The callback URL must be an http or https URL.") from None
        if len(callback_url) > Job._meta.get_field("callback_url").max_length:
            raise JobInputError("callback_url", "The callback URL is too long.")


def _formats_check(output_formats) -> list[str]:
    # Imported here, as whisper.tokenizer above: whisper brings torch, which a process that only
    # dispatches (the GPU agent's sweep) should not load.
    from jobs.outputs import FORMATS

    if not output_formats:
        return list(FORMATS)
    unknown = [fmt for fmt in output_formats if fmt not in FORMATS]
    if unknown:
        raise JobInputError("output_formats", f'Unknown format "{unknown[0]}". Available: {", ".join(FORMATS)}.')
    return list(dict.fromkeys(output_formats))


def device_capacity_mb(device: Device) -> int:
    """What a device could give one job when nothing else runs on it.

    Foreign use is left out on purpose: it comes and goes, and a job that fits once it
    is gone should wait rather than be refused.
    """
    return allocatable_mb(
        total_mb=device.total_mb, reserved_mb=device.reserved_mb, safety_factor=device.safety_factor, foreign_used_mb=0
    )


def largest_capacity_mb() -> int | None:
    """The largest capacity among enabled devices; None while no device is registered and enabled."""
    capacities = [device_capacity_mb(device) for device in Device.objects.filter(enabled=True)]
    return max(capacities) if capacities else None


def _fit_check(model: WhisperModel, memory_mb: int) -> None:
    largest = largest_capacity_mb()
    # No device yet (a fresh install whose agent has not reported): accept, the job waits.
    if largest is not None and memory_mb > largest:
        raise JobInputError(
            "model",
            f'Model "{model.name}" needs {memory_mb} MiB, more than any device here can give (largest: {largest} MiB).',
        )


def _files_check(files) -> None:
    if not files:
        raise JobInputError("files", "Add at least one audio file.")
    if len(files) > settings.MAX_FILES_PER_JOB:
        raise JobInputError("files", f"Too many files: at most {settings.MAX_FILES_PER_JOB} per job.")
    limit = settings.MAX_UPLOAD_MB * 1024 * 1024
    for upload in files:
        label = _upload_name(upload)
        if upload.size == 0:
            raise JobInputError("files", f"{label}: the file is empty.")
        if upload.size > limit:
            raise JobInputError("files", f"{label}: larger than the {settings.MAX_UPLOAD_MB} MB limit.")


def _upload_name(upload) -> str:
    # Browsers send bare names, but a client may send a path: keep only the last part.
    return Path((upload.name or "audio").replace("\\", "/")).name[:255] or "audio"


def _audio_file_store(job: Job, position: int, upload, stored: list[str]) -> AudioFile:
    original_name = _upload_name(upload)
    audio = AudioFile(job=job, position=position, original_name=original_name, size_bytes=upload.size)
    audio.file.save(original_name, upload, save=False)
    stored.append(audio.file.name)
    try:
        info = probe_audio(audio.file.path)
    except AudioProbeError as exc:
        raise JobInputError("files", f"{original_name}: {exc}") from None
    audio.duration_s = info.duration_s
    audio.save()
    return audio


def _files_remove(names: list[str]) -> None:
    folders = set()
    for name in names:
        try:
            default_storage.delete(name)
        except OSError:
            logger.warning("could not remove %s", name, exc_info=True)
        folders.add(os.path.dirname(default_storage.path(name)))
    for folder in folders:
        try:
            os.rmdir(folder)  # the job's own folder, only when empty
        except OSError:
            pass


# --- Transitions reported by the running task (jobs/tasks.py) ------------------------------------


def job_start_processing(*, job_id: int, attempt: int, load_seconds: float) -> bool:
    """loading → processing once the model is on the device. False: fenced out, stop."""
    with transaction.atomic():
        moved = Job.objects.filter(id=job_id, state=State.LOADING, attempt=attempt).update(
            state=State.PROCESSING, load_seconds=load_seconds
        )
        if moved != 1:
            return False
        _event(job_id, State.LOADING, State.PROCESSING, attempt, message=f"model loaded in {load_seconds:.2f} s")
        live.job_changed(job_id)
    return True


def job_report_progress(*, job_id: int, attempt: int, file_id: int, file_progress: float) -> bool:
    """Progress within one file (0..1); the job's progress is weighted by file duration.

    False when fenced out (cancelled, reaped, timed out, deleted): the task must stop.
    """
    file_progress = min(1.0, max(0.0, float(file_progress)))
    with transaction.atomic():
        AudioFile.objects.filter(
            id=file_id,
            job_id=job_id,
            job__state=State.PROCESSING,
            job__attempt=attempt,
            state__in=[AudioFile.State.PENDING, AudioFile.State.PROCESSING],
        ).update(state=AudioFile.State.PROCESSING, progress=file_progress)
        moved = Job.objects.filter(id=job_id, state=State.PROCESSING, attempt=attempt).update(
            progress=_overall_progress(job_id)
        )
        if moved != 1:
            return False
        live.job_changed(job_id)
    return True


def job_file_completed(*, job_id: int, attempt: int, file_id: int, result: dict, seconds: float) -> bool:
    """Store one file's Whisper result (text, segments, language) as soon as it is done."""
    with transaction.atomic():
        saved = AudioFile.objects.filter(
            id=file_id, job_id=job_id, job__state=State.PROCESSING, job__attempt=attempt
        ).update(
            state=AudioFile.State.COMPLETED,
            progress=1.0,
            text=(result.get("text") or "").strip(),
            language=result.get("language") or "",
            result=result,
            error="",
            transcribe_seconds=seconds,
        )
        if saved != 1:
            return False
        Job.objects.filter(id=job_id, state=State.PROCESSING, attempt=attempt).update(progress=_overall_progress(job_id))
        live.job_changed(job_id)
    return True


def job_file_failed(*, job_id: int, attempt: int, file_id: int, error: str) -> bool:
    """An undecodable file fails at once, without retries; the job goes on with the others."""
    with transaction.atomic():
        saved = AudioFile.objects.filter(
            id=file_id, job_id=job_id, job__state=State.PROCESSING, job__attempt=attempt
        ).update(state=AudioFile.State.FAILED, error=error[:ERROR_CHARS])
        if saved != 1:
            return False
        Job.objects.filter(id=job_id, state=State.PROCESSING, attempt=attempt).update(progress=_overall_progress(job_id))
        live.job_changed(job_id)
    return True


def job_complete(*, job_id: int, attempt: int, transcribe_seconds: float) -> bool:
    """processing → completed (or failed, with the reason, when every file failed); frees the memory."""
    with transaction.atomic():
        files = list(AudioFile.objects.filter(job_id=job_id).values("original_name", "state", "error"))
        failed = [f for f in files if f["state"] == AudioFile.State.FAILED]
        completed = sum(1 for f in files if f["state"] == AudioFile.State.COMPLETED)
        error = ""
        if failed:
            first = failed[0]
            error = f"{len(failed)} of {len(files)} files failed; {first['original_name']}: {first['error']}"[:ERROR_CHARS]
        to_state = State.COMPLETED if completed else State.FAILED
        moved = Job.objects.filter(id=job_id, state=State.PROCESSING, attempt=attempt).update(
            state=to_state,
            progress=1.0,
            finished_at=timezone.now(),
            transcribe_seconds=transcribe_seconds,
            error=error,
        )
        if moved != 1:
            return False
        _allocations_release(job_id, reason=to_state)
        _event(job_id, State.PROCESSING, to_state, attempt, message=error or f"transcribed in {transcribe_seconds:.2f} s")
        _job_ended(job_id)
    return True


def job_attempt_failed(*, job_id: int, attempt: int, error: str, oom: bool = False) -> Job | None:
    """The attempt failed: free its memory, then re-queue (with backoff) or fail the job.

    oom=True (CUDA out of memory): the model's memory estimate grows and the job is re-queued
    outside the retry budget, at most OOM_RETRY_LIMIT times. Returns the job as it now is
    (unchanged when fenced out), None when it no longer exists.
    """
    with transaction.atomic():
        job = Job.objects.select_for_update().filter(id=job_id, attempt=attempt, state__in=Job.ACTIVE_STATES).first()
        if job is not None:
            _allocations_release(job_id, reason="attempt failed")
            _attempt_end(job, error=error, oom=oom, scheduler=SchedulerSettings.load(), now=timezone.now())
    return Job.objects.filter(id=job_id).first()


def job_heartbeat(*, job_id: int, attempt: int) -> bool:
    """Renew the running attempt's lease. False when fenced out: the task must stop."""
    allocation_id = (
        Allocation.objects.filter(
            job_id=job_id,
            attempt=attempt,
            released_at__isnull=True,
            job__attempt=attempt,
            job__state__in=Job.ACTIVE_STATES,
        )
        .values_list("id", flat=True)
        .first()
    )
    if allocation_id is None:
        return False
    return allocation_renew(allocation_id=allocation_id, lease_s=SchedulerSettings.load().lease_s)


# --- User actions ---------------------------------------------------------------------------------


def job_cancel(*, job: Job) -> Job:
    """Cancel in any unfinished state; a running job's memory is freed at once.

    The task learns it at its next progress report or heartbeat (both return False) and stops.
    """
    with transaction.atomic():
        # The row lock orders this against the task's own transitions and the dispatcher.
        current = Job.objects.select_for_update().get(id=job.id)
        if current.is_final:
            raise JobStateError(f"Job {job.id} is already {current.state}.")
        Job.objects.filter(id=job.id, state=current.state, attempt=current.attempt).update(
            state=State.CANCELLED, finished_at=timezone.now()
        )
        freed = _allocations_release(job.id, reason="cancelled")
        _event(job.id, current.state, State.CANCELLED, current.attempt, message="cancelled")
        _job_ended(job.id, freed=freed)
    job.refresh_from_db()
    return job


def job_retry(*, job: Job) -> Job:
    """failed/cancelled → pending with a fresh retry budget; files already transcribed are kept."""
    with transaction.atomic():
        current = Job.objects.select_for_update().get(id=job.id)
        if current.state not in (State.FAILED, State.CANCELLED):
            raise JobStateError(f"Only failed or cancelled jobs can be retried; job {job.id} is {current.state}.")
        model = _model_check(current.model_name)
        memory_mb = max(current.memory_mb, memory_need_mb(model=model, scheduler=SchedulerSettings.load()))
        _fit_check(model, memory_mb)
        AudioFile.objects.filter(job_id=job.id).exclude(state=AudioFile.State.COMPLETED).update(
            state=AudioFile.State.PENDING, progress=0.0, error=""
        )
        Job.objects.filter(id=job.id, state=current.state, attempt=current.attempt).update(
            state=State.PENDING,
            failures=0,
            oom_retries=0,
            memory_mb=memory_mb,
            error="",
            queued_at=timezone.now(),
            not_before=None,
            finished_at=None,
            device=None,
            progress=_overall_progress(job.id),
        )
        _event(job.id, current.state, State.PENDING, current.attempt, message="retried by the user")
        live.job_changed(job.id)
        live.queue_changed()
        dispatch.dispatch_on_commit()
    job.refresh_from_db()
    return job


def job_delete(*, job: Job) -> None:
    """Delete the job, its files and history; a running job is stopped and its memory freed first."""
    with transaction.atomic():
        current = Job.objects.select_for_update().filter(id=job.id).first()
        if current is None:
            return
        freed = _allocations_release(job.id, reason="deleted")
        names = list(AudioFile.objects.filter(job_id=job.id).values_list("file", flat=True))
        current.delete()
        # Files go only once the rows are gone for good; a rollback keeps both.
        transaction.on_commit(lambda: _files_remove(names))
        live.job_changed(job.id, user_id=current.user_id)
        live.queue_changed()
        if freed:
            dispatch.dispatch_on_commit()


# --- Recovery (called by the periodic sweep) -----------------------------------------------------


def jobs_recover_lost(*, now: datetime | None = None) -> int:
    """Handle jobs whose task is gone or overdue; returns how many jobs were changed.

    - A lapsed lease (worker SIGKILLed, node lost): the ledger reaps the allocation and the
      job is re-queued or failed by its attempt count. q2 would redeliver the killed task
      forever; the raised attempt makes that copy a no-op.
    - Running longer than task_timeout_s: failed, memory freed.
    - Loading/processing with no active allocation (released by hand in admin): treated as lost.
    - Pending but larger than every enabled device (devices shrank since submission): failed.
    """
    now = now or timezone.now()
    scheduler = SchedulerSettings.load()
    changed = 0
    for allocation in allocations_reap_expired(now=now):
        if allocation.job_id is not None:
            changed += _attempt_lost(allocation.job_id, allocation.attempt, "the worker stopped renewing its lease", scheduler, now)
    changed += jobs_fail_timed_out(now=now, scheduler=scheduler)
    held = Allocation.objects.filter(job_id=OuterRef("pk"), released_at__isnull=True)
    for job_id, attempt in Job.objects.filter(state__in=Job.ACTIVE_STATES).filter(~Exists(held)).values_list("id", "attempt"):
        changed += _attempt_lost(job_id, attempt, "its memory reservation was released", scheduler, now)
    changed += jobs_fail_unplaceable()
    return changed


def jobs_fail_timed_out(*, now: datetime | None = None, scheduler: SchedulerSettings | None = None) -> int:
    now = now or timezone.now()
    scheduler = scheduler or SchedulerSettings.load()
    deadline = now - timedelta(seconds=scheduler.task_timeout_s)
    overdue = Job.objects.filter(state__in=Job.ACTIVE_STATES, started_at__lt=deadline).values_list("id", "attempt", "state")
    failed = 0
    for job_id, attempt, state in overdue:
        with transaction.atomic():
            moved = Job.objects.filter(id=job_id, state=state, attempt=attempt).update(
                state=State.FAILED,
                finished_at=now,
                error=f"Timed out: still running after {scheduler.task_timeout_s} s.",
            )
            if moved != 1:
                continue
            _allocations_release(job_id, reason="timed out")
            _event(job_id, state, State.FAILED, attempt, message=f"timed out after {scheduler.task_timeout_s} s")
            _job_ended(job_id)
            failed += 1
    return failed


def jobs_fail_unplaceable() -> int:
    largest = largest_capacity_mb()
    if largest is None:
        return 0
    failed = 0
    for job_id, attempt, memory_mb in Job.objects.filter(state=State.PENDING, memory_mb__gt=largest).values_list(
        "id", "attempt", "memory_mb"
    ):
        message = f"Needs {memory_mb} MiB; the largest device can give {largest} MiB."
        with transaction.atomic():
            moved = Job.objects.filter(id=job_id, state=State.PENDING, attempt=attempt).update(
                state=State.FAILED, finished_at=timezone.now(), error=message
            )
            if moved == 1:
                _event(job_id, State.PENDING, State.FAILED, attempt, message=message)
                live.job_changed(job_id)
                live.queue_changed()
                failed += 1
    return failed


def _attempt_lost(job_id: int, attempt: int, reason: str, scheduler: SchedulerSettings, now: datetime) -> int:
    with transaction.atomic():
        job = Job.objects.select_for_update().filter(id=job_id, attempt=attempt, state__in=Job.ACTIVE_STATES).first()
        if job is None:
            return 0
        _allocations_release(job_id, reason="lost")
        _attempt_end(job, error=f"Attempt {attempt} lost: {reason}.", oom=False, scheduler=scheduler, now=now)
    return 1


# --- Shared steps ---------------------------------------------------------------------------------


def _attempt_end(job: Job, *, error: str, oom: bool, scheduler: SchedulerSettings, now: datetime) -> None:
    """Re-queue or fail a locked, active job whose attempt ended badly (its memory already freed)."""
    error = (error or "unknown error")[:ERROR_CHARS]
    guard = Job.objects.filter(id=job.id, state=job.state, attempt=job.attempt)
    if oom and job.oom_retries < OOM_RETRY_LIMIT:
        grown = _oom_estimate_raise(job, scheduler)
        message = f"Out of device memory with {job.memory_mb} MiB reserved; re-queued with {grown} MiB."
        guard.update(oom_retries=F("oom_retries") + 1, memory_mb=grown, not_before=None, **_requeue(job, message))
        to_state = State.PENDING
    elif oom:
        message = f"Out of device memory {job.oom_retries + 1} times, last with {job.memory_mb} MiB reserved: {error}"
        guard.update(state=State.FAILED, finished_at=now, error=message[:ERROR_CHARS])
        to_state = State.FAILED
    elif job.failures + 1 > scheduler.max_retries:
        message = f"Failed after {job.failures + 1} attempt(s): {error}"
        guard.update(state=State.FAILED, failures=job.failures + 1, finished_at=now, error=message[:ERROR_CHARS])
        to_state = State.FAILED
    else:
        failures = job.failures + 1
        delay = min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_S * 2 ** (failures - 1))
        message = f"Attempt {job.attempt} failed ({error}); retry {failures} of {scheduler.max_retries} in {delay} s."
        guard.update(failures=failures, not_before=now + timedelta(seconds=delay), **_requeue(job, message))
        to_state = State.PENDING
    _event(job.id, job.state, to_state, job.attempt, device_id=job.device_id, message=message)
    _job_ended(job.id)


def _requeue(job: Job, message: str) -> dict:
    """Put the files the attempt was working on back to pending; returns the job's pending fields.

    Files the attempt finished keep their results; the next attempt does the rest. queued_at is
    kept: a job interrupted by a crash or out of memory keeps its place and the aging it earned,
    rather than going behind everything queued meanwhile (not_before still spaces out retries).
    """
    AudioFile.objects.filter(job_id=job.id, state=AudioFile.State.PROCESSING).update(
        state=AudioFile.State.PENDING, progress=0.0
    )
    return {
        "state": State.PENDING,
        "device": None,
        "error": message[:ERROR_CHARS],
        "progress": _overall_progress(job.id),
    }


def _oom_estimate_raise(job: Job, scheduler: SchedulerSettings) -> int:
    """Grow the reservation of `job` and the memory need of its model; returns the job's new reservation."""
    grown = math.ceil(job.memory_mb * OOM_GROWTH)
    largest = largest_capacity_mb()
    if largest is not None:
        grown = min(grown, largest)
    # Floor, so that need × multiplier of a new submission stays within the cap.
    model_mb = max(1, math.floor(grown / scheduler.inference_multiplier))
    # Greatest: two jobs of one model running out of memory at once raise it once, not twice.
    WhisperModel.objects.filter(name=job.model_name).update(memory_mb=Greatest(F("memory_mb"), model_mb))
    Job.objects.filter(state=State.PENDING, model_name=job.model_name).update(memory_mb=Greatest(F("memory_mb"), grown))
    return max(grown, job.memory_mb)


def _overall_progress(job_id: int) -> float:
    """Finished files count whole, the others by their progress; each weighs its duration."""
    done = 0.0
    total = 0.0
    for state, progress, duration in AudioFile.objects.filter(job_id=job_id).values_list("state", "progress", "duration_s"):
        weight = duration or 1.0
        finished = state in (AudioFile.State.COMPLETED, AudioFile.State.FAILED)
        done += weight * (1.0 if finished else progress)
        total += weight
    return min(1.0, done / total) if total else 0.0


def _allocations_release(job_id: int, *, reason: str) -> bool:
    freed = False
    for allocation_id in Allocation.objects.filter(job_id=job_id, released_at__isnull=True).values_list("id", flat=True):
        freed |= allocation_release(allocation_id=allocation_id, reason=reason)
    return freed


def _job_ended(job_id: int, *, freed: bool = True) -> None:
    live.job_changed(job_id)
    live.queue_changed()
    if freed:
        dispatch.dispatch_on_commit()


def _event(job_id: int, from_state: str, to_state: str, attempt: int, *, device_id=None, message: str = "") -> JobEvent:
    event = JobEvent.objects.create(
        job_id=job_id, from_state=from_state, to_state=to_state, attempt=attempt, device_id=device_id, message=message
    )
    if to_state in Job.FINAL_STATES:
        # Every path into a final state records its event here, so this is the one place
        # that tells the owner's callback_url (after commit; a requeue is not an end).
        job_callback_schedule(job_id=job_id)
    return event
