from django import forms
from django.contrib import admin, messages
from django.db.models import F, FloatField, Subquery, Value
from django.db.models.functions import Coalesce
from django.shortcuts import redirect
from django.urls import reverse

from jobs import services
from jobs.models import AudioFile, Job, JobEvent, SchedulerSettings, WhisperModel
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


# --- Jobs, their files and history (scheduler engineer). State changes go through jobs.services,
# so cancelling, retrying and deleting here free memory and files exactly as the portal does.


class AudioFileInline(admin.TabularInline):
    model = AudioFile
    extra = 0
    can_delete = False
    fields = ["position", "original_name", "duration_s", "size_bytes", "state", "progress", "language", "error"]
    readonly_fields = fields
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


class JobEventInline(admin.TabularInline):
    model = JobEvent
    extra = 0
    can_delete = False
    fields = ["at", "from_state", "to_state", "attempt", "device", "message"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ["id", "display_name", "user", "model_name", "priority", "state", "attempt", "device", "progress", "created_at"]
    list_filter = ["state", "priority", "model_name", "source"]
    search_fields = ["id", "name", "user__username", "files__original_name"]
    list_select_related = ["user", "device", "device__node"]
    date_hierarchy = "created_at"
    inlines = [AudioFileInline, JobEventInline]
    actions = ["cancel_selected", "retry_selected"]
    # Only the label is edited by hand; everything else is the scheduler's to change.
    readonly_fields = [
        f.name for f in Job._meta.get_fields() if getattr(f, "concrete", False) and f.name not in ("id", "name")
    ]

    def has_add_permission(self, request):
        return False  # jobs come in through the portal or the API, with their files checked

    @admin.action(description="Cancel selected jobs (frees their memory)")
    def cancel_selected(self, request, queryset):
        self._each(request, queryset, services.job_cancel, "cancelled")

    @admin.action(description="Retry selected failed or cancelled jobs")
    def retry_selected(self, request, queryset):
        self._each(request, queryset, services.job_retry, "re-queued")

    def get_deleted_objects(self, objs, request):
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        # Files and events cannot be deleted on their own, only with their job: the job's permission counts.
        perms_needed -= {AudioFile._meta.verbose_name, JobEvent._meta.verbose_name}
        return deleted, counts, perms_needed, protected

    def delete_model(self, request, obj):
        services.job_delete(job=obj)

    def delete_queryset(self, request, queryset):
        for job in queryset:
            services.job_delete(job=job)

    def _each(self, request, queryset, action, done: str) -> None:
        changed = 0
        for job in queryset:
            try:
                action(job=job)
                changed += 1
            except (services.JobStateError, services.JobInputError) as exc:
                self.message_user(request, f"Job {job.id}: {exc}", messages.WARNING)
        if changed:
            self.message_user(request, f"{changed} job(s) {done}.", messages.SUCCESS)


@admin.register(AudioFile)
class AudioFileAdmin(admin.ModelAdmin):
    list_display = ["id", "original_name", "job", "state", "duration_s", "size_bytes", "language"]
    list_filter = ["state"]
    search_fields = ["original_name", "job__id", "job__user__username"]
    list_select_related = ["job"]
    readonly_fields = [f.name for f in AudioFile._meta.get_fields() if getattr(f, "concrete", False)]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # a file goes with its job (Job delete removes it from disk too)


@admin.register(JobEvent)
class JobEventAdmin(admin.ModelAdmin):
    """The transition history: read-only."""

    list_display = ["at", "job", "from_state", "to_state", "attempt", "device", "message"]
    list_filter = ["to_state"]
    search_fields = ["job__id", "message"]
    list_select_related = ["job", "device", "device__node"]
    date_hierarchy = "at"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
