"""Raise base's memory need after measuring it on an H100 (docs/gpu_check_results.md).

The seed's 1 GB × 1.5 = 1536 MiB did not cover base's worst-case window: its worker peaked at
1538 MiB (NVML, CUDA context included), and four at once took 6178 MiB against 6144 reserved.
A worker's CUDA context (~520 MiB there) dominates small models. 1280 MiB × 1.5 = 1920 MiB
leaves ~20% over the measured peak. Only rows still at the seed's value are changed, so a
figure staff edited in admin is kept.
"""

from django.db import migrations

SEED_MB = 1024
MEASURED_NEED_MB = 1280


def raise_base(apps, schema_editor):
    WhisperModel = apps.get_model("jobs", "WhisperModel")
    WhisperModel.objects.filter(name__in=["base", "base.en"], memory_mb=SEED_MB).update(memory_mb=MEASURED_NEED_MB)


def restore_seed(apps, schema_editor):
    WhisperModel = apps.get_model("jobs", "WhisperModel")
    WhisperModel.objects.filter(name__in=["base", "base.en"], memory_mb=MEASURED_NEED_MB).update(memory_mb=SEED_MB)


class Migration(migrations.Migration):
    dependencies = [("jobs", "0003_job_retry_budgets")]
    operations = [migrations.RunPython(raise_base, restore_seed)]
