"""The New job form. Choices are checked here; files and the model are checked by job_create."""

from django import forms
from django.conf import settings
from whisper.tokenizer import LANGUAGES

from jobs.models import Job, WhisperModel
from jobs.outputs import FORMATS

LANGUAGE_CHOICES = [("", "Detect automatically")] + sorted(
    ((code, name.title()) for code, name in LANGUAGES.items()), key=lambda choice: choice[1]
)


def model_choices() -> list[tuple[str, str]]:
    """Enabled catalog models whose checkpoint is on disk: what a job can run on now."""
    return [
        (m.name, f"{m.name} ({m.memory_mb} MiB)")
        for m in WhisperModel.objects.filter(enabled=True)
        if m.installed
    ]


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    """Several files under one name, as Django's docs show; each one is checked by FileField."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("widget", MultipleFileInput(attrs={"accept": "audio/*,video/*"}))
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None):
        if isinstance(data, (list, tuple)):
            if not data and self.required:
                raise forms.ValidationError(self.error_messages["required"], code="required")
            return [super(MultipleFileField, self).clean(item, initial) for item in data]
        return [super().clean(data, initial)]


class JobNewForm(forms.Form):
    files = MultipleFileField(
        help_text=f"Up to {settings.MAX_FILES_PER_JOB} audio or video files, {settings.MAX_UPLOAD_MB} MB each."
    )
    model = forms.ChoiceField()
    language = forms.ChoiceField(choices=LANGUAGE_CHOICES, required=False)
    task = forms.ChoiceField(choices=Job.Task.choices, initial=Job.Task.TRANSCRIBE)
    priority = forms.ChoiceField(choices=Job.Priority.choices, initial=Job.Priority.NORMAL)
    output_formats = forms.MultipleChoiceField(
        choices=[(f, f) for f in FORMATS], initial=list(FORMATS), widget=forms.CheckboxSelectMultiple, required=False
    )
    name = forms.CharField(max_length=200, required=False, help_text="Optional label; defaults to the first file's name.")
    initial_prompt = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), required=False)
    word_timestamps = forms.BooleanField(required=False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        choices = model_choices()
        self.fields["model"].choices = choices
        names = [name for name, _ in choices]
        if settings.WHISPERHUB_DEFAULT_MODEL in names:
            self.fields["model"].initial = settings.WHISPERHUB_DEFAULT_MODEL
