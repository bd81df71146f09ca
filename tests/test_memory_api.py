"""GET /api/memory_status (the seed's shape) and GET /api/gpus/."""

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from gpus import services
from gpus.models import Device
from tests.gpu_factories import make_device, make_node

pytestmark = pytest.mark.django_db

MEMORY_STATUS = "/api/memory_status"


@pytest.fixture
def pool(db):
    node = make_node("gpu-1")
    first = make_device(node, 0, total_mb=24576, reserved_mb=0)  # allocatable floor(24576 × 0.8) = 19660
    second = make_device(node, 1, total_mb=81920, reserved_mb=2048, safety_factor=0.9)
    Device.objects.filter(id=first.id).update(used_mb=5000, foreign_used_mb=1000, utilization_pct=42.0, temperature_c=61.0)
    services.allocation_reserve(device_id=first.id, mb=3072)
    return first, second


def test_the_route_is_the_seeds():
    assert reverse("api-memory-status") == MEMORY_STATUS


def test_memory_status_has_the_seed_fields_and_the_figures_in_mib(alice_api, pool):
    first, second = pool
    response = alice_api.get(MEMORY_STATUS)

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {str(first.id), str(second.id)}
    status = body[str(first.id)]
    # allocatable = 19660 − 1000 foreign = 18660 MiB; allocated 3072; available 15588.
    assert {k: status[k] for k in ("total", "allocatable", "allocated", "reserved", "available")} == {
        "total": "24.0GB",
        "allocatable": "18.2GB",
        "allocated": "3.0GB",
        "reserved": "0.0GB",
        "available": "15.2GB",
    }
    assert status["usage_percent"] == round(3072 / 18660 * 100, 1)
    assert {k: status[k] for k in ("total_mb", "allocatable_mb", "allocated_mb", "reserved_mb", "available_mb", "foreign_used_mb")} == {
        "total_mb": 24576,
        "allocatable_mb": 18660,
        "allocated_mb": 3072,
        "reserved_mb": 0,
        "available_mb": 15588,
        "foreign_used_mb": 1000,
    }
    assert (status["used_mb"], status["utilization_pct"], status["temperature_c"]) == (5000, 42.0, 61.0)
    assert (status["online"], status["node"], status["kind"], status["name"]) == (True, "gpu-1", "simulated", "Simulated 0")

    idle = body[str(second.id)]
    assert (idle["reserved"], idle["allocatable_mb"], idle["usage_percent"], idle["used_mb"]) == ("2.0GB", 71884, 0.0, None)


def test_memory_status_with_a_session(alice_client, pool):
    response = alice_client.get(MEMORY_STATUS)
    assert response.status_code == 200 and len(response.json()) == 2


def test_memory_status_needs_a_signed_in_user(pool):
    assert APIClient().get(MEMORY_STATUS).status_code == 401
    assert APIClient(HTTP_AUTHORIZATION="Token not-a-token").get(MEMORY_STATUS).status_code == 401


def test_query_count_does_not_grow_with_devices(alice_api, pool, django_assert_num_queries):
    # 1. the token and its user, 2. devices with their node and the sum of active allocations.
    with django_assert_num_queries(2):
        assert len(alice_api.get(MEMORY_STATUS).json()) == 2
    node = make_node("gpu-2")
    for index in range(5):
        device = make_device(node, index)
        services.allocation_reserve(device_id=device.id, mb=100)
    with django_assert_num_queries(2):
        assert len(alice_api.get(MEMORY_STATUS).json()) == 7
    with django_assert_num_queries(2):
        assert len(alice_api.get("/api/gpus/").json()) == 7


def test_gpu_list_shows_each_device_with_its_node(alice_api, pool):
    first, second = pool
    response = alice_api.get("/api/gpus/")

    assert response.status_code == 200
    rows = response.json()
    assert [row["id"] for row in rows] == [first.id, second.id]
    row = rows[0]
    assert (row["uuid"], row["index"], row["kind"], row["total_mb"], row["allocated_mb"]) == (
        first.uuid, 0, "simulated", 24576, 3072,
    )
    assert row["node"]["name"] == "gpu-1" and row["node"]["online"] is True
    assert row["node"]["cluster_name"] == "whisperhub-gpu-1"
    assert rows[1]["safety_factor"] == 0.9


def test_an_offline_node_shows_offline(alice_api, db):
    device = make_device(make_node("gone", online=False))
    body = alice_api.get(MEMORY_STATUS).json()
    assert body[str(device.id)]["online"] is False


def test_the_schema_describes_memory_status(alice_api):
    schema = alice_api.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    keyed = schema["components"]["schemas"]["MemoryStatus"]
    assert keyed["additionalProperties"] == {"$ref": "#/components/schemas/DeviceMemory"}
    fields = schema["components"]["schemas"]["DeviceMemory"]["properties"]
    assert {"total", "allocatable", "allocated", "reserved", "available", "usage_percent", "available_mb"} <= set(fields)
