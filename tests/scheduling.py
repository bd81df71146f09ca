"""Builders shared by the scheduler tests: nodes and simulated devices as rows, jobs, small audio."""

import io
import math
import struct
import wave
from datetime import timedelta

from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from gpus.models import Device, Node
from jobs.models import AudioFile, Job, SchedulerSettings, WhisperModel


def make_node(name="node-a", *, online=True) -> Node:
    last_seen = timezone.now() if online else timezone.now() - timedelta(days=1)
    return Node.objects.create(name=name, cluster_name=f"whisperhub-{name}", backend="sim", last_seen=last_seen)


def make_device(node, index=0, *, total_mb=10_000, safety_factor=1.0, kind=Device.Kind.SIMULATED, **extra) -> Device:
    return Device.objects.create(
        node=node,
        index=index,
        uuid=f"SIM-{node.name}-{index}",
        name=f"Simulated {index}",
        kind=kind,
        total_mb=total_mb,
        safety_factor=safety_factor,
        **extra,
    )


def install_model(path, *, name="tiny.en", memory_mb=1000, english_only=True, enabled=True) -> WhisperModel:
    """A catalog row whose checkpoint is any existing file: enough for validation and dispatch."""
    model, _ = WhisperModel.objects.update_or_create(
        name=name,
        defaults={"checkpoint": str(path), "memory_mb": memory_mb, "english_only": english_only, "enabled": enabled},
    )
    return model


def scheduler(**fields) -> SchedulerSettings:
    settings = SchedulerSettings.load()
    for key, value in fields.items():
        setattr(settings, key, value)
    settings.save()
    return settings


def make_job(user, *, priority=Job.Priority.NORMAL, memory_mb=1000, waited_s=0, durations=(10.0,), **extra) -> Job:
    """A pending job as job_create would leave it, without uploading (files are rows only)."""
    queued_at = timezone.now() - timedelta(seconds=waited_s)
    job = Job.objects.create(
        user=user, model_name="tiny.en", priority=priority, memory_mb=memory_mb, queued_at=queued_at, **extra
    )
    for position, duration in enumerate(durations):
        AudioFile.objects.create(
            job=job, position=position, original_name=f"clip{position}.wav", file=f"audio/{job.id}/{position}.wav",
            duration_s=duration,
        )
    return job


def tone_wav(seconds=0.5, rate=16000) -> bytes:
    """A short sine tone as a 16-bit mono wav: real audio, made without external programs."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        frames = (int(8000 * math.sin(2 * math.pi * 440 * n / rate)) for n in range(int(seconds * rate)))
        out.writeframes(b"".join(struct.pack("<h", sample) for sample in frames))
    return buffer.getvalue()


def upload(name="clip.wav", content=None) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, tone_wav() if content is None else content, content_type="audio/wav")
