"""Alert rules as data: evaluate them against the pool's figures, fire, resolve, notify.

A rule fires when its condition has held at every evaluation for duration_s (the stretch
starts at rule.pending_since; a gap in evaluations longer than MAX_GAP restarts it, since
nobody looked in between). It resolves at the first evaluation where the condition clears.
Each firing and each resolution notifies once: e-mail through Django's mail backend
(bounded by EMAIL_TIMEOUT_S) and, when the rule names one, a webhook POST delivered by a
q2 task with retries, so a slow or dead receiver never holds up the evaluator.

Who runs it: every GPU agent calls evaluate_due() in its loop; an advisory lock and the
time of the last MetricSample make one evaluation per EVALUATE_EVERY across all nodes.
"""

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import requests
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.mail import get_connection, send_mail
from django.core.validators import validate_email
from django.db import connection, transaction
from django.utils import timezone
from django_q.tasks import async_task

from gpus import figures
from gpus.models import Alert, AlertMetric, AlertRule, MetricSample

logger = logging.getLogger(__name__)

EVALUATE_EVERY = timedelta(seconds=10)
MAX_GAP = timedelta(minutes=2)
SAMPLES_KEPT = timedelta(days=1)
EMAIL_TIMEOUT_S = 5  # the agent's telemetry loop waits at most this per message in an SMTP outage
WEBHOOK_TIMEOUT_S = 5
WEBHOOK_BACKOFF_S = (1, 3, 9)  # waits between the 4 attempts
_ADVISORY_LOCK = 0x57484150  # "WHAP": one evaluator at a time across nodes

RATIO = (0.0, 1.0)
# What a sane threshold is, per metric.
THRESHOLD_RANGE = {
    AlertMetric.MEMORY_USAGE: RATIO,
    AlertMetric.DEVICE_MEMORY_USAGE: RATIO,
    AlertMetric.ERROR_RATE: RATIO,
    AlertMetric.RETRY_RATE: RATIO,
    AlertMetric.QUEUE_LENGTH: (0, 1_000_000),
    AlertMetric.NODES_OFFLINE: (0, 10_000),
    AlertMetric.TEMPERATURE: (0, 150),
}
MAX_DURATION_S = 7 * 24 * 3600


def alert_rule_check(rule: AlertRule) -> None:
    """Refuse a malformed rule with a message per field (admin shows them)."""
    errors = {}
    if rule.metric not in AlertMetric.values:
        errors["metric"] = f"Unknown metric {rule.metric!r}; choose one of: {', '.join(AlertMetric.values)}."
    if rule.comparison not in AlertRule.Comparison.values:
        errors["comparison"] = f"Unknown comparison {rule.comparison!r}."
    if rule.duration_s is None or not 0 <= rule.duration_s <= MAX_DURATION_S:
        errors["duration_s"] = f"The duration must be between 0 and {MAX_DURATION_S} seconds."
    if "metric" not in errors:
        low, high = THRESHOLD_RANGE[rule.metric]
        if rule.threshold is None or not math.isfinite(rule.threshold) or not low <= rule.threshold <= high:
            errors["threshold"] = f"For this metric the threshold must lie between {low} and {high}."
    for address in recipients_parse(rule.email_recipients):
        try:
            validate_email(address)
        except ValidationError:
            errors["email_recipients"] = f"Not an e-mail address: {address!r}."
    if errors:
        raise ValidationError(errors)


def recipients_parse(text: str) -> list[str]:
    return [part.strip() for part in (text or "").replace(";", ",").split(",") if part.strip()]


def metrics_read(now: datetime) -> dict[str, float]:
    """Every metric a rule can name, read once per evaluation."""
    pool = figures.pool_memory()
    recent = figures.finished_between(now - figures.RATE_WINDOW, now)
    hottest = figures.hottest_temperature()
    return {
        AlertMetric.MEMORY_USAGE: pool.usage,
        AlertMetric.DEVICE_MEMORY_USAGE: pool.device_max_usage,
        AlertMetric.QUEUE_LENGTH: figures.queue_length(),
        AlertMetric.ERROR_RATE: recent.error_rate,
        AlertMetric.RETRY_RATE: recent.retry_rate,
        AlertMetric.NODES_OFFLINE: figures.nodes_offline(),
        AlertMetric.TEMPERATURE: hottest if hottest is not None else 0.0,
    }


def condition_holds(rule: AlertRule, value: float) -> bool:
    return {
        AlertRule.Comparison.GT: value > rule.threshold,
        AlertRule.Comparison.GE: value >= rule.threshold,
        AlertRule.Comparison.LT: value < rule.threshold,
        AlertRule.Comparison.LE: value <= rule.threshold,
    }[rule.comparison]


@dataclass(frozen=True)
class AlertChange:
    alert_id: int
    rule_name: str
    event: str  # "fired" or "resolved"
    value: float


def alerts_evaluate(*, now: datetime, values: dict[str, float] | None = None) -> list[AlertChange]:
    """One evaluation of every rule at `now`; returns what fired or resolved (already notified)."""
    if values is None:
        values = metrics_read(now)
    changes = []
    for rule_id in AlertRule.objects.values_list("id", flat=True):
        change = _rule_step(rule_id, values, now)
        if change is not None:
            changes.append(change)
            alert_notify(alert_id=change.alert_id, event=change.event)
    if changes:
        from whisperhub import live

        live.alerts_changed()
    return changes


def _rule_step(rule_id: int, values: dict[str, float], now: datetime) -> AlertChange | None:
    with transaction.atomic():
        # The row lock serialises evaluators, so a firing can't be created twice.
        rule = AlertRule.objects.select_for_update().filter(pk=rule_id).first()
        if rule is None:
            return None
        value = values[rule.metric]
        firing = rule.alerts.filter(state=Alert.State.FIRING).first()
        holds = rule.enabled and condition_holds(rule, value)
        gap = rule.last_evaluated_at is None or now - rule.last_evaluated_at > MAX_GAP
        change = None
        if holds:
            if rule.pending_since is None or (gap and firing is None):
                rule.pending_since = now
            if firing is None and now - rule.pending_since >= timedelta(seconds=rule.duration_s):
                alert = Alert.objects.create(
                    rule=rule, value=value, started_at=rule.pending_since, fired_at=now, message=_message(rule, value)
                )
                change = AlertChange(alert.pk, rule.name, "fired", value)
        else:
            rule.pending_since = None
            if firing is not None:
                firing.state = Alert.State.RESOLVED
                firing.resolved_at = now
                firing.resolved_value = value
                firing.save(update_fields=["state", "resolved_at", "resolved_value"])
                change = AlertChange(firing.pk, rule.name, "resolved", value)
        rule.last_value = value
        rule.last_evaluated_at = now
        rule.save(update_fields=["pending_since", "last_value", "last_evaluated_at"])
    return change


def _message(rule: AlertRule, value: float) -> str:
    return (
        f"{rule.name}: {rule.get_metric_display()} is {value:g}, "
        f"{rule.get_comparison_display()} {rule.threshold:g} for {rule.duration_s} s"
    )


def evaluate_due(*, now: datetime | None = None) -> list[AlertChange]:
    """Called by every GPU agent each loop: evaluate when no node has in the last EVALUATE_EVERY.

    Records a MetricSample each time it evaluates (the dashboard's history). Never raises
    into the agent: a failed evaluation is logged and tried again at the next loop.
    """
    now = now or timezone.now()
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [_ADVISORY_LOCK])
                if not cursor.fetchone()[0]:
                    return []
            last = MetricSample.objects.order_by("-at").values_list("at", flat=True).first()
            if last is not None and now - last < EVALUATE_EVERY:
                return []
            values = metrics_read(now)
            MetricSample.objects.create(
                at=now,
                queue_length=int(values[AlertMetric.QUEUE_LENGTH]),
                running=figures.running_count(),
                memory_usage=values[AlertMetric.MEMORY_USAGE],
            )
            MetricSample.objects.filter(at__lt=now - SAMPLES_KEPT).delete()
        return alerts_evaluate(now=now, values=values)
    except Exception:  # noqa: BLE001 - the agent's telemetry loop must go on
        logger.exception("alert evaluation failed")
        return []


def alert_notify(*, alert_id: int, event: str) -> None:
    """Notify once for this event: e-mail now (bounded), the webhook through a q2 task."""
    alert = Alert.objects.select_related("rule").get(pk=alert_id)
    _email_send(alert, event)
    if alert.rule.webhook_url:
        _record(alert_id, {"channel": "webhook", "event": event, "status": "queued", "attempts": 0})
        # On commit: a task enqueued inside a transaction that rolls back must not run.
        transaction.on_commit(
            lambda: async_task("gpus.alerts.alert_webhook_deliver", alert_id, event, task_name=f"alert-{alert_id}-{event}")
        )


def _recipients(rule: AlertRule) -> list[str]:
    explicit = recipients_parse(rule.email_recipients)
    if explicit:
        return explicit
    staff = get_user_model().objects.filter(is_staff=True, is_active=True).exclude(email="")
    return sorted(set(staff.values_list("email", flat=True)))


def _email_send(alert: Alert, event: str) -> None:
    to = _recipients(alert.rule)
    entry = {"channel": "email", "event": event, "to": to, "at": timezone.now().isoformat()}
    if not to:
        _record(alert.pk, {**entry, "status": "skipped", "error": "no recipients"})
        return
    subject = f"[WhisperHub] {'FIRING' if event == 'fired' else 'resolved'}: {alert.rule.name}"
    body = alert.message if event == "fired" else f"{alert.message}\nResolved at {alert.resolved_at:%Y-%m-%d %H:%M:%S %Z}, value {alert.resolved_value:g}."
    try:
        send_mail(
            subject,
            body,
            settings.DEFAULT_FROM_EMAIL,
            to,
            connection=get_connection(timeout=EMAIL_TIMEOUT_S),
        )
    except Exception as exc:  # noqa: BLE001 - SMTP trouble is recorded on the alert, not raised
        _record(alert.pk, {**entry, "status": "failed", "error": repr(exc)})
        return
    _record(alert.pk, {**entry, "status": "sent"})


def _record(alert_id: int, entry: dict) -> None:
    """Append (or, for the same channel and event, replace) a notification outcome on the alert."""
    with transaction.atomic():
        alert = Alert.objects.select_for_update().get(pk=alert_id)
        kept = [n for n in alert.notifications if (n.get("channel"), n.get("event")) != (entry["channel"], entry["event"])]
        alert.notifications = kept + [entry]
        alert.save(update_fields=["notifications"])


def alert_webhook_deliver(alert_id: int, event: str) -> bool:
    """q2 task: POST the alert as JSON, retrying with backoff; the outcome is stored on the alert."""
    alert = Alert.objects.select_related("rule").filter(pk=alert_id).first()
    if alert is None or not alert.rule.webhook_url:
        return False
    payload = {
        "rule": alert.rule.name,
        "metric": alert.rule.metric,
        "event": event,
        "state": alert.state,
        "value": alert.value if event == "fired" else alert.resolved_value,
        "threshold": alert.rule.threshold,
        "message": alert.message,
        "started_at": alert.started_at.isoformat(),
        "fired_at": alert.fired_at.isoformat(),
        "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
    }
    errors = []
    for attempt in range(1, len(WEBHOOK_BACKOFF_S) + 2):
        try:
            response = requests.post(alert.rule.webhook_url, json=payload, timeout=WEBHOOK_TIMEOUT_S)
            if response.status_code < 300:
                _record(alert_id, _webhook_entry(event, "sent", attempt, errors, response.status_code))
                return True
            errors.append(f"HTTP {response.status_code}")
        except requests.RequestException as exc:
            errors.append(type(exc).__name__)
        if attempt <= len(WEBHOOK_BACKOFF_S):
            time.sleep(WEBHOOK_BACKOFF_S[attempt - 1])
    _record(alert_id, _webhook_entry(event, "failed", len(errors), errors, None))
    logger.warning("alert %s webhook %s failed after %d attempts: %s", alert_id, event, len(errors), errors)
    return False


def _webhook_entry(event, status, attempts, errors, http_status) -> dict:
    return {
        "channel": "webhook",
        "event": event,
        "status": status,
        "attempts": attempts,
        "errors": errors,
        "http_status": http_status,
        "at": timezone.now().isoformat(),
    }
