"""The seed's alert rules (design §6.2.2), editable in admin afterwards."""

from django.db import migrations

SEED_RULES = [
    # name, metric, threshold, duration_s
    ("High memory usage", "memory_usage", 0.9, 300),
    ("Long queue", "queue_length", 10, 600),
    ("High error rate", "error_rate", 0.1, 300),
]


def add_rules(apps, schema_editor):
    AlertRule = apps.get_model("gpus", "AlertRule")
    for name, metric, threshold, duration_s in SEED_RULES:
        AlertRule.objects.get_or_create(
            name=name, defaults={"metric": metric, "comparison": "gt", "threshold": threshold, "duration_s": duration_s}
        )


def remove_rules(apps, schema_editor):
    AlertRule = apps.get_model("gpus", "AlertRule")
    AlertRule.objects.filter(name__in=[rule[0] for rule in SEED_RULES]).delete()


class Migration(migrations.Migration):
    dependencies = [("gpus", "0003_alerts")]

    operations = [migrations.RunPython(add_rules, remove_rules)]
