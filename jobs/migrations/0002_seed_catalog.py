"""Initial data from the original design: model memory needs and scheduler settings."""

from django.db import migrations

GIB = 1024
# The seed's needs in GB, as MiB. Checkpoints are filled in by import_model / fetch_model.
SEED_MODELS = [
    ("tiny", 1, False),
    ("tiny.en", 1, True),
    ("base", 1, False),
    ("base.en", 1, True),
    ("small", 2, False),
    ("small.en", 2, True),
    ("medium", 5, False),
    ("medium.en", 5, True),
    ("large", 10, False),
    ("large-v2", 10, False),
    ("large-v3", 10, False),
    ("turbo", 6, False),
]


def seed(apps, schema_editor):
    WhisperModel = apps.get_model("jobs", "WhisperModel")
    SchedulerSettings = apps.get_model("jobs", "SchedulerSettings")
    for name, gb, english_only in SEED_MODELS:
        WhisperModel.objects.get_or_create(name=name, defaults={"memory_mb": gb * GIB, "english_only": english_only})
    SchedulerSettings.objects.get_or_create(pk=1)


class Migration(migrations.Migration):
    dependencies = [("jobs", "0001_initial")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
