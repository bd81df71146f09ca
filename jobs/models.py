"""Jobs, their audio files and history, the model catalog and scheduler settings.

State changes go through jobs/services.py (guarded updates on id, state, attempt);
these models hold rows and the invariants PostgreSQL can guard.
"""

import uuid
from pathlib import Path

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class WhisperModel(models.Model):
    """A catalog entry: a model name, its checkpoint file and how much memory it needs."""

    name = models.CharField(max_length=100, unique=True, help_text='Name users choose, e.g. "tiny.en", "base", "large-v3".')
    checkpoint = models.CharField(
        max_length=500,
        blank=True,
        help_text="openai-whisper checkpoint file, relative to WHISPERHUB_MODEL_DIR (or absolute). Empty: not installed.",
    )
    memory_mb = models.PositiveIntegerField(
        "memory need (MiB)", help_text="Memory the loaded model needs before the inference multiplier is applied."
    )
    english_only = models.BooleanField(default=False, help_text="An .en model: English only, cannot translate.")
    preload = models.BooleanField(default=False, help_text="Load at worker start when memory allows, and keep loaded.")
    enabled = models.BooleanField(default=True, help_text="Off: hidden from users and refused at submission.")
    sha256 = models.CharField(max_length=64, blank=True, help_text="Checksum of the checkpoint file.")
    size_bytes = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["memory_mb", "name"]
        constraints = [models.CheckConstraint(condition=Q(memory_mb__gt=0), name="whispermodel_memory_positive")]

    def __str__(self):
        return self.name

    @property
    def checkpoint_path(self) -> Path | None:
        if not self.checkpoint:
            return None
        path = Path(self.checkpoint)
        return path if path.is_absolute() else Path(settings.WHISPERHUB_MODEL_DIR) / path

    @property
    def installed(self) -> bool:
        path = self.checkpoint_path
        return path is not None and path.is_file()


class SchedulerSettings(models.Model):
    """The one scheduler settings row (pk=1), edited in admin and read at each dispatch."""

    poll_interval_s = models.FloatField("poll interval (s)", default=1.0, help_text="Period of the dispatch sweep.")
    max_concurrent_tasks = models.PositiveIntegerField(default=4, help_text="Most jobs holding devices at once.")
    task_timeout_s = models.PositiveIntegerField("task timeout (s)", default=3600, help_text="A job running longer is stopped and failed.")
    max_retries = models.PositiveIntegerField(default=3, help_text="Attempts after the first before a job fails.")
    priority_weight_high = models.PositiveIntegerField(default=3)
    priority_weight_normal = models.PositiveIntegerField(default=2)
    priority_weight_low = models.PositiveIntegerField(default=1)
    aging_s = models.PositiveIntegerField(
        "aging (s)", default=300, help_text="Each this many seconds of waiting adds one to a pending job's priority weight."
    )
    inference_multiplier = models.FloatField(default=1.5, help_text="Reservation = model memory need × this.")
    # 5 s / 30 s from docs/RELIABILITY.md: a running job survives 25 s without the database (a
    # PostgreSQL restart took 10–17 s to recover), and a dead worker's memory is free in ~31 s.
    lease_s = models.PositiveIntegerField("lease (s)", default=30, help_text="An allocation not renewed for this long is reaped.")
    heartbeat_s = models.PositiveIntegerField("heartbeat (s)", default=5, help_text="How often a running job renews its lease.")

    class Meta:
        verbose_name = "scheduler settings"
        verbose_name_plural = "scheduler settings"
        constraints = [
            models.CheckConstraint(condition=Q(pk=1), name="schedulersettings_singleton"),
            models.CheckConstraint(condition=Q(inference_multiplier__gte=1), name="schedulersettings_multiplier_ge_1"),
            models.CheckConstraint(condition=Q(poll_interval_s__gt=0), name="schedulersettings_poll_positive"),
            models.CheckConstraint(condition=Q(heartbeat_s__lt=models.F("lease_s")), name="schedulersettings_heartbeat_lt_lease"),
        ]

    def __str__(self):
        return "Scheduler settings"

    @classmethod
    def load(cls) -> "SchedulerSettings":
        obj, _ = cls.objects.get_or_create(pk=1)
        return obj

    def weight(self, priority: str) -> int:
        return {
            Job.Priority.HIGH: self.priority_weight_high,
            Job.Priority.NORMAL: self.priority_weight_normal,
            Job.Priority.LOW: self.priority_weight_low,
        }[priority]


class Job(models.Model):
    class State(models.TextChoices):
        PENDING = "pending"
        LOADING = "loading"
        PROCESSING = "processing"
        COMPLETED = "completed"
        FAILED = "failed"
        CANCELLED = "cancelled"

    ACTIVE_STATES = (State.LOADING, State.PROCESSING)
    FINAL_STATES = (State.COMPLETED, State.FAILED, State.CANCELLED)

    class Priority(models.TextChoices):
        HIGH = "high"
        NORMAL = "normal"
        LOW = "low"

    class Task(models.TextChoices):
        TRANSCRIBE = "transcribe"
        TRANSLATE = "translate"

    class Source(models.TextChoices):
        PORTAL = "portal"
        API = "api"
        OPENAI = "openai"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs")
    name = models.CharField(max_length=200, blank=True, help_text="Optional label; defaults to the first file's name.")
    source = models.CharField(max_length=10, choices=Source.choices, default=Source.PORTAL)
    model_name = models.CharField(max_length=100, help_text="Catalog name of the Whisper model.")
    language = models.CharField(max_length=20, blank=True, help_text="Spoken language code; empty: detect.")
    task = models.CharField(max_length=10, choices=Task.choices, default=Task.TRANSCRIBE)
    priority = models.CharField(max_length=10, choices=Priority.choices, default=Priority.NORMAL)
    temperature = models.FloatField(default=0.0)
    beam_size = models.PositiveSmallIntegerField(default=5)
    initial_prompt = models.TextField(blank=True)
    word_timestamps = models.BooleanField(default=False)
    output_formats = models.JSONField(default=list, blank=True, help_text="Formats offered for download.")
    callback_url = models.URLField(blank=True, help_text="Receives a POST when the job ends.")

    state = models.CharField(max_length=12, choices=State.choices, default=State.PENDING, db_index=True)
    attempt = models.PositiveIntegerField(default=0, help_text="Dispatches so far; the fencing token of the running task.")
    # Counted apart from `attempt`, which never goes down (it fences stale tasks): a manual retry
    # resets these budgets without reusing an attempt number.
    failures = models.PositiveIntegerField(
        default=0, help_text="Failed attempts since submission or the last manual retry; over max_retries the job fails."
    )
    oom_retries = models.PositiveIntegerField(
        "out-of-memory retries", default=0, help_text="Re-queues after running out of device memory (a separate, small budget)."
    )
    memory_mb = models.PositiveIntegerField("reservation (MiB)", default=0, help_text="Memory the job reserves when placed.")
    device = models.ForeignKey("gpus.Device", on_delete=models.SET_NULL, null=True, blank=True, related_name="jobs")
    progress = models.FloatField(default=0.0, help_text="Overall progress, 0 to 1.")
    error = models.TextField(blank=True)

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    queued_at = models.DateTimeField(default=timezone.now, help_text="When it was submitted or retried by its owner (aging counts from here).")
    not_before = models.DateTimeField(null=True, blank=True, help_text="A retried job waits until then.")
    started_at = models.DateTimeField(null=True, blank=True, help_text="When the current attempt was placed.")
    finished_at = models.DateTimeField(null=True, blank=True)
    queue_seconds = models.FloatField(null=True, blank=True, help_text="Submission to placement of the last attempt.")
    load_seconds = models.FloatField(null=True, blank=True)
    transcribe_seconds = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["user", "-created_at"], name="job_user_recent"),
            models.Index(fields=["queued_at"], condition=Q(state="pending"), name="job_pending_queue"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(progress__gte=0) & Q(progress__lte=1), name="job_progress_range"),
            models.CheckConstraint(
                condition=Q(state__in=["pending", "loading", "processing", "completed", "failed", "cancelled"]),
                name="job_state_valid",
            ),
            models.CheckConstraint(condition=Q(priority__in=["high", "normal", "low"]), name="job_priority_valid"),
        ]

    def __str__(self):
        return f"Job {self.pk} ({self.state})"

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        first = next(iter(self.files.all()), None)
        return first.original_name if first else f"Job {self.pk}"

    @property
    def is_final(self) -> bool:
        return self.state in self.FINAL_STATES


def audio_upload_to(instance: "AudioFile", filename: str) -> str:
    # The stored name never comes from the user: a random name under the job's folder,
    # so no path trick in an uploaded name can leave MEDIA_ROOT.
    suffix = Path(filename).suffix.lower()
    if not suffix.isascii() or not suffix[1:].isalnum() or len(suffix) > 10:
        suffix = ""
    return f"audio/{instance.job_id}/{uuid.uuid4().hex}{suffix}"


class AudioFile(models.Model):
    class State(models.TextChoices):
        PENDING = "pending"
        PROCESSING = "processing"
        COMPLETED = "completed"
        FAILED = "failed"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="files")
    position = models.PositiveSmallIntegerField(default=0)
    original_name = models.CharField(max_length=255, help_text="The uploaded name, for display and downloads only.")
    file = models.FileField(upload_to=audio_upload_to, max_length=500)
    size_bytes = models.BigIntegerField(default=0)
    duration_s = models.FloatField(null=True, blank=True, help_text="Audio length as ffprobe reports it.")
    state = models.CharField(max_length=12, choices=State.choices, default=State.PENDING)
    progress = models.FloatField(default=0.0)
    text = models.TextField(blank=True)
    language = models.CharField(max_length=20, blank=True, help_text="Detected (or given) language.")
    result = models.JSONField(null=True, blank=True, help_text="Whisper's result: text, segments, language.")
    error = models.TextField(blank=True)
    transcribe_seconds = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["job", "position"]
        constraints = [
            models.UniqueConstraint(fields=["job", "position"], name="audiofile_unique_position"),
            models.CheckConstraint(condition=Q(progress__gte=0) & Q(progress__lte=1), name="audiofile_progress_range"),
        ]

    def __str__(self):
        return self.original_name


class JobEvent(models.Model):
    """One state transition, so a job's history can be read back."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    at = models.DateTimeField(default=timezone.now)
    from_state = models.CharField(max_length=12, blank=True)
    to_state = models.CharField(max_length=12)
    attempt = models.PositiveIntegerField(default=0)
    device = models.ForeignKey("gpus.Device", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    message = models.TextField(blank=True)

    class Meta:
        ordering = ["at", "id"]
        indexes = [models.Index(fields=["job", "at"], name="jobevent_job_at")]

    def __str__(self):
        return f"{self.job_id}: {self.from_state or '∅'} → {self.to_state}"
