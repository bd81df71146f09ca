from django import forms
from django.contrib import admin
from django.db.models import F, FloatField, Subquery, Value
from django.db.models.functions import Coalesce
from django.shortcuts import redirect
from django.urls import reverse

from jobs.models import SchedulerSettings, WhisperModel
from whisperhub import live

MULTIPLIER_DEFAULT = SchedulerSettings._meta.get_field("inference_multiplier").default


class WhisperModelForm(forms.ModelForm):
    class Meta:
        model = WhisperModel
        fields = "__all__"
        error_messages = {"memory_mb": {"min_value": "A model needs some memory: at least 1 MiB."}}

    def clean_memory_mb(self):
        memory = self.cleaned_data["memory_mb"]
        if memory is not None and memory < 1:
            raise forms.ValidationError("A model needs some memory: at least 1 MiB.")
        return memory


@admin.register(WhisperModel)
class WhisperModelAdmin(admin.ModelAdmin):
    form = WhisperModelForm
    list_display = ["name", "memory_mb", "reservation_mb", "checkpoint", "is_installed", "english_only", "preload", "enabled"]
    list_editable = ["memory_mb", "preload", "enabled"]
    list_filter = ["enabled", "english_only", "preload"]
    search_fields = ["name"]
    readonly_fields = ["sha256", "size_bytes", "created_at"]

    def get_queryset(self, request):
        # What a job of this model reserves (need × the scheduler's multiplier), in the same query.
        multiplier = SchedulerSettings.objects.filter(pk=1).values("inference_multiplier")
        return super().get_queryset(request).annotate(
            reservation=F("memory_mb") * Coalesce(Subquery(multiplier), Value(MULTIPLIER_DEFAULT), output_field=FloatField())
        )

    @admin.display(description="reservation (MiB)", ordering="reservation")
    def reservation_mb(self, model):
        return round(model.reservation)

    @admin.display(boolean=True, description="installed")
    def is_installed(self, model):
        return model.installed

    def get_changelist_form(self, request, **kwargs):
        return super().get_changelist_form(request, form=WhisperModelForm, **kwargs)


class SchedulerSettingsForm(forms.ModelForm):
    class Meta:
        model = SchedulerSettings
        fields = "__all__"

    def clean_poll_interval_s(self):
        poll = self.cleaned_data["poll_interval_s"]
        if poll is not None and poll <= 0:
            raise forms.ValidationError("The poll interval must be above 0 seconds.")
        return poll

    def clean_inference_multiplier(self):
        multiplier = self.cleaned_data["inference_multiplier"]
        if multiplier is not None and multiplier < 1:
            raise forms.ValidationError("The multiplier must be at least 1: a job needs at least its model's memory.")
        return multiplier

    def clean(self):
        data = super().clean()
        heartbeat, lease = data.get("heartbeat_s"), data.get("lease_s")
        if heartbeat is not None and lease is not None and heartbeat >= lease:
            self.add_error(
                "heartbeat_s",
                f"The heartbeat ({heartbeat} s) must be shorter than the lease ({lease} s), "
                "or running jobs lose their memory between two renewals.",
            )
        return data


@admin.register(SchedulerSettings)
class SchedulerSettingsAdmin(admin.ModelAdmin):
    """The one settings row: no second one, no deletion; the list goes straight to it."""

    form = SchedulerSettingsForm
    fieldsets = [
        ("Dispatch", {"fields": ["poll_interval_s", "max_concurrent_tasks", "task_timeout_s", "max_retries"]}),
        ("Priority", {"fields": ["priority_weight_high", "priority_weight_normal", "priority_weight_low", "aging_s"]}),
        ("Memory and leases", {"fields": ["inference_multiplier", "lease_s", "heartbeat_s"]}),
    ]

    def has_add_permission(self, request):
        return not SchedulerSettings.objects.exists()

    def has_delete_permission(self, request, obj=None):
        return False

    def changelist_view(self, request, extra_context=None):
        settings = SchedulerSettings.load()
        return redirect(reverse("admin:jobs_schedulersettings_change", args=[settings.pk]))

    def save_model(self, request, obj, form, change):
        obj.pk = 1  # the singleton's key, whatever the sequence says
        super().save_model(request, obj, form, change)
        live.queue_changed()  # a new cap or weights can change what runs next
