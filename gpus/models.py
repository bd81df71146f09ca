"""Device inventory and the memory-reservation ledger's rows.

The ledger's arithmetic lives in gpus/services.py; these models only hold rows and
the invariants PostgreSQL itself can guard.
"""

from datetime import timedelta

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Node(models.Model):
    """A machine running a GPU agent and a qcluster against the shared database."""

    name = models.CharField(max_length=200, unique=True, help_text="Host name, or WHISPERHUB_NODE_NAME.")
    cluster_name = models.CharField(
        max_length=200,
        help_text="The django-q2 queue this node's cluster consumes; transcription tasks for its devices go there.",
    )
    backend = models.CharField(max_length=50, blank=True, help_text="Device backend the agent uses (nvml, cpu, sim).")
    started_at = models.DateTimeField(null=True, blank=True, help_text="When the agent last started.")
    last_seen = models.DateTimeField(null=True, blank=True, help_text="Last telemetry report from the agent.")

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    @property
    def online(self) -> bool:
        if self.last_seen is None:
            return False
        horizon = timedelta(seconds=settings.WHISPERHUB_NODE_OFFLINE_AFTER)
        return self.last_seen >= timezone.now() - horizon


class Device(models.Model):
    class Kind(models.TextChoices):
        CUDA = "cuda", "CUDA GPU"
        CPU = "cpu", "CPU"
        SIMULATED = "simulated", "Simulated GPU"

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="devices")
    index = models.PositiveSmallIntegerField(help_text="Index on its node (CUDA device ordinal for GPUs).")
    uuid = models.CharField(max_length=100, unique=True, help_text="Stable identity (NVML UUID for GPUs).")
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=20, choices=Kind.choices)
    total_mb = models.PositiveIntegerField("total (MiB)", help_text="Memory the device has, in MiB.")
    reserved_mb = models.PositiveIntegerField(
        "reserved (MiB)", default=0, help_text="Held back from WhisperHub (display, other tenants), in MiB."
    )
    safety_factor = models.FloatField(
        default=0.8, help_text="Fraction of (total − reserved) WhisperHub may hand out, in (0, 1]."
    )
    enabled = models.BooleanField(default=True, help_text="Off: no new work is placed here.")
    draining = models.BooleanField(
        default=False, help_text="On: running jobs finish, no new reservations are granted."
    )
    # Telemetry written by the node's agent.
    used_mb = models.PositiveIntegerField("used (MiB)", null=True, blank=True, help_text="Memory in use as the driver reports it.")
    foreign_used_mb = models.PositiveIntegerField(
        "foreign use (MiB)",
        default=0,
        help_text="Memory used by processes WhisperHub did not start; it reduces what the ledger hands out.",
    )
    utilization_pct = models.FloatField("utilisation %", null=True, blank=True)
    temperature_c = models.FloatField("temperature °C", null=True, blank=True)
    telemetry_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["node__name", "index"]
        constraints = [
            models.UniqueConstraint(fields=["node", "index"], name="device_unique_index_per_node"),
            models.CheckConstraint(condition=Q(reserved_mb__lte=models.F("total_mb")), name="device_reserved_le_total"),
            models.CheckConstraint(
                condition=Q(safety_factor__gt=0) & Q(safety_factor__lte=1), name="device_safety_factor_range"
            ),
        ]

    def __str__(self):
        return f"{self.node.name}:{self.index} {self.name}"


class Allocation(models.Model):
    """One reservation of device memory for one job attempt.

    The device's allocated figure is the sum of its active rows (released_at is null):
    derived, never a stored counter that could drift.
    """

    device = models.ForeignKey(Device, on_delete=models.PROTECT, related_name="allocations")
    job = models.ForeignKey("jobs.Job", on_delete=models.SET_NULL, null=True, blank=True, related_name="allocations")
    attempt = models.PositiveIntegerField(default=0, help_text="The job attempt this reservation belongs to (fencing token).")
    mb = models.PositiveIntegerField("MiB")
    created_at = models.DateTimeField(default=timezone.now)
    lease_expires_at = models.DateTimeField(help_text="Renewed by the running job; the reaper releases lapsed leases.")
    released_at = models.DateTimeField(null=True, blank=True)
    release_reason = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["device"], condition=Q(released_at__isnull=True), name="allocation_active_by_device"),
            models.Index(fields=["lease_expires_at"], condition=Q(released_at__isnull=True), name="allocation_active_lease"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(mb__gt=0), name="allocation_mb_positive"),
            models.UniqueConstraint(
                fields=["job"], condition=Q(released_at__isnull=True), name="allocation_one_active_per_job"
            ),
        ]

    def __str__(self):
        return f"{self.mb} MiB on {self.device_id} for job {self.job_id}"

    @property
    def active(self) -> bool:
        return self.released_at is None
