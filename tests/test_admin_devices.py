"""Admin for nodes, devices, allocations, the model catalog and scheduler settings."""

import pytest
from django.db import IntegrityError, transaction
from django.urls import reverse

from gpus import services
from gpus.models import Allocation, Device
from jobs.models import SchedulerSettings, WhisperModel
from tests.gpu_factories import make_device, make_node

pytestmark = pytest.mark.django_db


@pytest.fixture
def device(db):
    return make_device(make_node("gpu-1"), total_mb=24576)


def device_form(device, **changes):
    data = {"reserved_mb": device.reserved_mb, "safety_factor": device.safety_factor, "enabled": "on"}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def test_device_list_shows_the_ledger_figures_in_a_fixed_number_of_queries(admin_client, device, django_assert_max_num_queries):
    services.allocation_reserve(device_id=device.id, mb=4096)
    node = make_node("gpu-2")
    for index in range(4):
        make_device(node, index)
    url = reverse("admin:gpus_device_changelist")
    # Session, user, count, page of devices (with node and allocated sum), plus the node filter's choices.
    with django_assert_max_num_queries(10) as captured:
        response = admin_client.get(url)
    baseline = len(captured)
    assert response.status_code == 200
    content = response.content.decode()
    assert "19660" in content  # allocatable of the 24 GiB device
    assert "15564" in content  # available = 19660 − 4096
    assert "20.8" in content  # usage %

    for index in range(4, 10):
        make_device(node, index)
    with django_assert_max_num_queries(baseline):
        admin_client.get(url)


def test_staff_edit_reserved_and_safety_and_only_those_fields_are_written(admin_client, device):
    Device.objects.filter(id=device.id).update(used_mb=1234)
    url = reverse("admin:gpus_device_change", args=[device.id])

    response = admin_client.post(url, device_form(device, reserved_mb=2048, safety_factor=0.5))

    assert response.status_code == 302
    device.refresh_from_db()
    assert (device.reserved_mb, device.safety_factor, device.used_mb) == (2048, 0.5, 1234)
    assert services.memory_figures()[device.id].allocatable_mb == (24576 - 2048) // 2


@pytest.mark.parametrize(
    "changes, field, message",
    [
        ({"reserved_mb": -1}, "reserved_mb", "Reserved memory can&#x27;t be negative."),
        ({"reserved_mb": 30000}, "reserved_mb", "Reserved memory (30000 MiB) can&#x27;t exceed the device&#x27;s total (24576 MiB)."),
        ({"safety_factor": 0}, "safety_factor", "The safety factor must be above 0 and at most 1 (e.g. 0.8)."),
        ({"safety_factor": 1.5}, "safety_factor", "The safety factor must be above 0 and at most 1 (e.g. 0.8)."),
        ({"safety_factor": -0.2}, "safety_factor", "The safety factor must be above 0 and at most 1 (e.g. 0.8)."),
    ],
)
def test_bad_device_settings_are_refused_with_a_message(admin_client, device, changes, field, message):
    response = admin_client.post(reverse("admin:gpus_device_change", args=[device.id]), device_form(device, **changes))

    assert response.status_code == 200
    assert message in response.content.decode()
    assert field in response.context["adminform"].form.errors
    device.refresh_from_db()
    assert (device.reserved_mb, device.safety_factor) == (0, 0.8)


def test_a_safety_factor_of_one_is_allowed(admin_client, device):
    response = admin_client.post(reverse("admin:gpus_device_change", args=[device.id]), device_form(device, safety_factor=1))
    assert response.status_code == 302
    device.refresh_from_db()
    assert device.safety_factor == 1.0


def test_the_changelist_form_validates_too(admin_client, device):
    data = {
        "form-TOTAL_FORMS": "1",
        "form-INITIAL_FORMS": "1",
        "form-0-id": str(device.id),
        "form-0-reserved_mb": "99999",
        "form-0-safety_factor": "0.8",
        "form-0-enabled": "on",
        "_save": "Save",
    }
    response = admin_client.post(reverse("admin:gpus_device_changelist"), data)
    assert "can&#x27;t exceed the device&#x27;s total" in response.content.decode()
    device.refresh_from_db()
    assert device.reserved_mb == 0


def test_lowering_the_share_under_running_jobs_warns(admin_client, device):
    services.allocation_reserve(device_id=device.id, mb=10000)
    response = admin_client.post(
        reverse("admin:gpus_device_change", args=[device.id]), device_form(device, safety_factor=0.2), follow=True
    )
    assert "Running jobs keep their memory" in response.content.decode()


@pytest.mark.parametrize(
    "values, constraint",
    [
        ({"reserved_mb": 30000}, "device_reserved_le_total"),
        ({"safety_factor": 0}, "device_safety_factor_range"),
        ({"safety_factor": 1.01}, "device_safety_factor_range"),
        ({"reserved_mb": -1}, "reserved_mb"),
    ],
)
def test_the_database_refuses_bad_device_values(device, values, constraint):
    with pytest.raises(IntegrityError, match=constraint), transaction.atomic():
        Device.objects.filter(id=device.id).update(**values)


def test_the_database_refuses_empty_allocations(device):
    with pytest.raises(IntegrityError, match="allocation_mb_positive"), transaction.atomic():
        Allocation.objects.create(device=device, mb=0, lease_expires_at=device.node.last_seen)


def test_devices_are_not_added_by_hand(admin_client, device):
    assert admin_client.get(reverse("admin:gpus_device_add")).status_code == 403


def test_node_list_shows_online_state(admin_client, device):
    make_node("gone", online=False)
    response = admin_client.get(reverse("admin:gpus_node_changelist"))
    content = response.content.decode()
    assert response.status_code == 200 and "gpu-1" in content and "gone" in content
    assert 'alt="True"' in content and 'alt="False"' in content


def test_allocations_are_read_only_and_released_by_an_action(admin_client, device):
    active = services.allocation_reserve(device_id=device.id, mb=1000)
    done = services.allocation_reserve(device_id=device.id, mb=500)
    services.allocation_release(allocation_id=done.id, reason="finished")

    assert admin_client.get(reverse("admin:gpus_allocation_add")).status_code == 403
    assert admin_client.get(reverse("admin:gpus_allocation_changelist") + "?state=active").status_code == 200
    response = admin_client.post(
        reverse("admin:gpus_allocation_changelist"),
        {"action": "release", "_selected_action": [active.id, done.id]},
        follow=True,
    )

    assert "Released 1 allocation(s); 1 were already released." in response.content.decode()
    active.refresh_from_db()
    done.refresh_from_db()
    assert active.released_at is not None and active.release_reason == "released in admin by admin"
    assert done.release_reason == "finished"
    assert services.memory_figures()[device.id].allocated_mb == 0


def test_staff_without_the_permission_cannot_release(charlie_client, charlie, device):
    from django.contrib.auth.models import Permission

    charlie.user_permissions.add(Permission.objects.get(codename="view_allocation"))
    allocation = services.allocation_reserve(device_id=device.id, mb=1000)
    response = charlie_client.post(
        reverse("admin:gpus_allocation_changelist"), {"action": "release", "_selected_action": [allocation.id]}
    )
    assert response.status_code in (200, 302)
    allocation.refresh_from_db()
    assert allocation.released_at is None


def test_scheduler_settings_are_a_singleton(admin_client):
    SchedulerSettings.load()
    assert admin_client.get(reverse("admin:jobs_schedulersettings_add")).status_code == 403
    assert admin_client.get(reverse("admin:jobs_schedulersettings_delete", args=[1])).status_code == 403
    response = admin_client.get(reverse("admin:jobs_schedulersettings_changelist"))
    assert response.status_code == 302 and response.url == reverse("admin:jobs_schedulersettings_change", args=[1])


def scheduler_form(**changes):
    data = {
        "poll_interval_s": 1.0, "max_concurrent_tasks": 4, "task_timeout_s": 3600, "max_retries": 3,
        "priority_weight_high": 3, "priority_weight_normal": 2, "priority_weight_low": 1, "aging_s": 300,
        "inference_multiplier": 1.5, "lease_s": 60, "heartbeat_s": 10,
    }
    data.update(changes)
    return data


def test_scheduler_settings_edit_and_validation(admin_client):
    url = reverse("admin:jobs_schedulersettings_change", args=[SchedulerSettings.load().pk])

    assert admin_client.post(url, scheduler_form(max_concurrent_tasks=8)).status_code == 302
    assert SchedulerSettings.load().max_concurrent_tasks == 8

    for changes, message in [
        ({"heartbeat_s": 60}, "The heartbeat (60 s) must be shorter than the lease (60 s)"),
        ({"inference_multiplier": 0.5}, "The multiplier must be at least 1"),
        ({"poll_interval_s": 0}, "The poll interval must be above 0 seconds."),
    ]:
        response = admin_client.post(url, scheduler_form(**changes))
        assert response.status_code == 200 and message in response.content.decode(), changes
    assert SchedulerSettings.load().heartbeat_s == 10


def test_model_catalog_shows_the_reservation_and_refuses_zero_memory(admin_client):
    tiny = WhisperModel.objects.get(name="tiny")
    response = admin_client.get(reverse("admin:jobs_whispermodel_changelist"))
    assert response.status_code == 200
    assert str(round(tiny.memory_mb * 1.5)) in response.content.decode()

    url = reverse("admin:jobs_whispermodel_change", args=[tiny.id])
    data = {"name": "tiny", "checkpoint": "", "memory_mb": 0, "enabled": "on", "created_at_0": "2026-01-01", "created_at_1": "00:00:00"}
    response = admin_client.post(url, data)
    assert response.status_code == 200
    assert "A model needs some memory: at least 1 MiB." in response.content.decode()
