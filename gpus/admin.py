from django import forms
from django.contrib import admin, messages
from django.db import models
from django.db.models import Count

from gpus.models import Alert, AlertRule, Allocation, Device, Node
from gpus.services import allocation_release, device_figures, devices_with_allocated, memory_figures
from whisperhub import live


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


# --- Inventory and the ledger -------------------------------------------------------------------


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    """Nodes are registered by their agents; staff look, and may delete a node that is gone for good."""

    list_display = ["name", "cluster_name", "backend", "is_online", "last_seen", "started_at", "device_count"]
    readonly_fields = ["name", "cluster_name", "backend", "started_at", "last_seen"]
    search_fields = ["name"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(device_count=Count("devices"))

    def has_add_permission(self, request):
        return False

    @admin.display(boolean=True, description="online")
    def is_online(self, node):
        return node.online

    @admin.display(description="devices", ordering="device_count")
    def device_count(self, node):
        return node.device_count


class DeviceForm(forms.ModelForm):
    """Staff settings of a device, checked with messages that say what is allowed.

    The database refuses the same values (named constraints), so a bad value can't get in
    by another path either.
    """

    class Meta:
        model = Device
        fields = ["reserved_mb", "safety_factor", "enabled", "draining"]
        error_messages = {"reserved_mb": {"min_value": "Reserved memory can't be negative."}}

    def clean_reserved_mb(self):
        reserved = self.cleaned_data["reserved_mb"]
        if reserved is not None and reserved > self.instance.total_mb:
            raise forms.ValidationError(
                f"Reserved memory ({reserved} MiB) can't exceed the device's total ({self.instance.total_mb} MiB)."
            )
        return reserved

    def clean_safety_factor(self):
        factor = self.cleaned_data["safety_factor"]
        if factor is not None and not 0 < factor <= 1:
            raise forms.ValidationError("The safety factor must be above 0 and at most 1 (e.g. 0.8).")
        return factor


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    form = DeviceForm
    list_display = [
        "__str__", "kind", "total_mb", "reserved_mb", "safety_factor", "allocatable", "allocated", "available",
        "usage", "foreign_used_mb", "utilization_pct", "temperature_c", "enabled", "draining", "is_online",
    ]
    list_editable = ["reserved_mb", "safety_factor", "enabled", "draining"]
    list_filter = ["kind", "enabled", "draining", "node"]
    list_select_related = ["node"]
    search_fields = ["name", "uuid", "node__name"]
    readonly_fields = [
        "node", "index", "uuid", "name", "kind", "total_mb", "allocatable", "allocated", "available", "usage",
        "used_mb", "foreign_used_mb", "utilization_pct", "temperature_c", "telemetry_at",
    ]
    fieldsets = [
        (None, {"fields": ["node", "index", "uuid", "name", "kind", "total_mb"]}),
        ("Ledger", {"fields": ["reserved_mb", "safety_factor", "enabled", "draining", "allocatable", "allocated", "available", "usage"]}),
        ("Telemetry", {"fields": ["used_mb", "foreign_used_mb", "utilization_pct", "temperature_c", "telemetry_at"]}),
    ]

    def get_queryset(self, request):
        # The allocated sum comes with the rows: the list costs one query however many devices.
        return devices_with_allocated()

    def get_changelist_form(self, request, **kwargs):
        return super().get_changelist_form(request, form=DeviceForm, **kwargs)

    def has_add_permission(self, request):
        return False  # devices are discovered by their node's agent

    def save_model(self, request, obj, form, change):
        if not form.changed_data:
            return
        # Only what staff changed: the agent writes telemetry to this row every few seconds.
        obj.save(update_fields=form.changed_data)
        live.devices_changed()
        figures = memory_figures([obj.id])[obj.id]
        if figures.allocated_mb > figures.allocatable_mb:
            self.message_user(
                request,
                f"{obj}: {figures.allocated_mb} MiB are reserved by running jobs but only {figures.allocatable_mb} MiB "
                "are allocatable now. Running jobs keep their memory; nothing new is placed here until it fits.",
                messages.WARNING,
            )

    def _figures(self, device):
        return device_figures(device)

    @admin.display(description="allocatable (MiB)")
    def allocatable(self, device):
        return self._figures(device).allocatable_mb

    @admin.display(description="allocated (MiB)", ordering="allocated_mb")
    def allocated(self, device):
        return self._figures(device).allocated_mb

    @admin.display(description="available (MiB)")
    def available(self, device):
        return self._figures(device).available_mb

    @admin.display(description="usage %")
    def usage(self, device):
        return self._figures(device).usage_percent

    @admin.display(boolean=True, description="online")
    def is_online(self, device):
        return device.node.online


class ActiveFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("active", "active"), ("released", "released")]

    def queryset(self, request, queryset):
        if self.value() == "active":
            return queryset.filter(released_at__isnull=True)
        if self.value() == "released":
            return queryset.filter(released_at__isnull=False)
        return queryset


@admin.register(Allocation)
class AllocationAdmin(admin.ModelAdmin):
    """The ledger's rows: written only through gpus.services, so read-only here, with a release action."""

    list_display = ["id", "device", "job", "attempt", "mb", "created_at", "lease_expires_at", "released_at", "release_reason"]
    list_filter = [ActiveFilter, "device"]
    list_select_related = ["device__node", "job"]
    actions = ["release"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # history; a stuck reservation is released, not deleted

    def has_release_permission(self, request):
        return request.user.has_perm("gpus.change_allocation")

    @admin.action(description="Release the selected allocations", permissions=["release"])
    def release(self, request, queryset):
        reason = f"released in admin by {request.user.get_username()}"
        released = sum(allocation_release(allocation_id=pk, reason=reason) for pk in queryset.values_list("id", flat=True))
        skipped = queryset.count() - released
        self.message_user(request, f"Released {released} allocation(s); {skipped} were already released.", messages.SUCCESS)
