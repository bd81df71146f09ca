from django.contrib import admin
from django.db import models

from gpus.models import Alert, AlertRule


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    # Validation: AlertRule.clean() → gpus.alerts.alert_rule_check (metric known, duration ≥ 0, threshold in range).
    list_display = ["name", "metric", "comparison", "threshold", "duration_s", "enabled", "last_value", "pending_since"]
    list_filter = ["enabled", "metric"]
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    readonly_fields = ["pending_since", "last_value", "last_evaluated_at"]
    fieldsets = [
        (None, {"fields": ["name", "enabled", "metric", "comparison", "threshold", "duration_s"]}),
        ("Notifications", {"fields": ["email_recipients", "webhook_url"]}),
        ("Evaluator state", {"fields": ["pending_since", "last_value", "last_evaluated_at"]}),
    ]


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    """Alerts are history written by the evaluator: viewable, never edited by hand."""

    list_display = ["rule", "state", "value", "started_at", "fired_at", "resolved_at", "notified"]
    list_filter = ["state", "rule"]
    date_hierarchy = "fired_at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="notifications")
    def notified(self, alert):
        return ", ".join(f"{n.get('channel')} {n.get('event')}: {n.get('status')}" for n in alert.notifications) or "—"
