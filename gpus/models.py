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


class AlertMetric(models.TextChoices):
    # Readers live in gpus/alerts.py under the same values; ratios are 0..1.
    MEMORY_USAGE = "memory_usage", "Memory usage of the pool (allocated ÷ allocatable, 0–1)"
    DEVICE_MEMORY_USAGE = "device_memory_usage", "Memory usage of the fullest device (0–1)"
    QUEUE_LENGTH = "queue_length", "Queue length (pending jobs)"
    ERROR_RATE = "error_rate", "Error rate (failed ÷ finished jobs, last 15 min, 0–1)"
    RETRY_RATE = "retry_rate", "Retry rate (retried ÷ placed attempts, last 15 min, 0–1)"
    NODES_OFFLINE = "nodes_offline", "Nodes offline"
    TEMPERATURE = "temperature", "Hottest device temperature (°C)"


class AlertComparison(models.TextChoices):
    GT = "gt", "above"
    GE = "ge", "at or above"
    LT = "lt", "below"
    LE = "le", "at or below"


class AlertRule(models.Model):
    """A condition on one metric that must hold for duration_s before it fires (gpus/alerts.py evaluates)."""

    Metric = AlertMetric
    Comparison = AlertComparison

    name = models.CharField(max_length=100, unique=True)
    metric = models.CharField(max_length=30, choices=Metric.choices)
    comparison = models.CharField(max_length=2, choices=Comparison.choices, default=Comparison.GT)
    threshold = models.FloatField()
    duration_s = models.IntegerField(
        "duration (s)", default=300, help_text="The condition must hold this long, without a break, before the alert fires."
    )
    enabled = models.BooleanField(default=True)
    email_recipients = models.TextField(
        blank=True, help_text="Comma-separated addresses; empty: the e-mail addresses of active staff users."
    )
    webhook_url = models.URLField(blank=True, help_text="Receives a JSON POST when the alert fires and when it resolves.")
    # Evaluator state: when the condition was first seen holding in the current stretch.
    pending_since = models.DateTimeField(null=True, blank=True, editable=False)
    last_value = models.FloatField(null=True, blank=True, editable=False)
    last_evaluated_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(duration_s__gte=0), name="alertrule_duration_nonnegative"),
            models.CheckConstraint(
                condition=Q(metric__in=AlertMetric.values) & Q(comparison__in=AlertComparison.values),
                name="alertrule_metric_comparison_valid",
            ),
        ]

    def __str__(self):
        return self.name

    def clean(self):
        from gpus.alerts import alert_rule_check

        alert_rule_check(self)


class Alert(models.Model):
    """One firing of a rule, kept after it resolves."""

    class State(models.TextChoices):
        FIRING = "firing"
        RESOLVED = "resolved"

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="alerts")
    state = models.CharField(max_length=10, choices=State.choices, default=State.FIRING)
    value = models.FloatField(help_text="The metric's value when the alert fired.")
    resolved_value = models.FloatField(null=True, blank=True)
    message = models.TextField(blank=True)
    started_at = models.DateTimeField(help_text="When the condition began to hold.")
    fired_at = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)
    notifications = models.JSONField(
        default=list, blank=True, help_text="One entry per notification sent or tried: channel, event, outcome, attempts."
    )

    class Meta:
        ordering = ["-fired_at"]
        constraints = [
            models.UniqueConstraint(fields=["rule"], condition=Q(state="firing"), name="alert_one_firing_per_rule"),
        ]

    def __str__(self):
        return f"{self.rule.name} ({self.state})"


class MetricSample(models.Model):
    """Pool figures recorded at each alert evaluation: the history behind the dashboard's charts.

    Queue length and memory use at a past moment cannot be rebuilt from job rows (retries
    reset queued_at), so the evaluator writes them down; rows older than a day are pruned.
    """

    at = models.DateTimeField(db_index=True)
    queue_length = models.PositiveIntegerField()
    running = models.PositiveIntegerField()
    memory_usage = models.FloatField(help_text="Pool allocated ÷ allocatable, 0–1.")

    class Meta:
        ordering = ["at"]

    def __str__(self):
        return f"{self.at:%H:%M:%S} queue {self.queue_length}"
