"""Device and memory APIs: the seed's /api/memory_status, and the device list."""

from drf_spectacular.extensions import OpenApiSerializerExtension
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from gpus.services import device_figures, devices_with_allocated


def gib(mb: int) -> str:
    """The seed's display form: GiB with one decimal, e.g. 19660 MiB -> "19.2GB"."""
    return f"{mb / 1024:.1f}GB"


def device_memory(device) -> dict:
    """One device's ledger figures and telemetry, as /api/memory_status shows them."""
    figures = device_figures(device)
    return {
        "total": gib(figures.total_mb),
        "allocatable": gib(figures.allocatable_mb),
        "allocated": gib(figures.allocated_mb),
        "reserved": gib(figures.reserved_mb),
        "available": gib(figures.available_mb),
        "usage_percent": figures.usage_percent,
        "total_mb": figures.total_mb,
        "allocatable_mb": figures.allocatable_mb,
        "allocated_mb": figures.allocated_mb,
        "reserved_mb": figures.reserved_mb,
        "available_mb": figures.available_mb,
        "foreign_used_mb": figures.foreign_used_mb,
        "safety_factor": device.safety_factor,
        "used_mb": device.used_mb,
        "utilization_pct": device.utilization_pct,
        "temperature_c": device.temperature_c,
        "telemetry_at": device.telemetry_at,
        "online": device.node.online,
        "enabled": device.enabled,
        "draining": device.draining,
        "node": device.node.name,
        "index": device.index,
        "name": device.name,
        "kind": device.kind,
    }


class DeviceMemorySerializer(serializers.Serializer):
    total = serializers.CharField(help_text='Total memory, GiB with one decimal, e.g. "24.0GB".')
    allocatable = serializers.CharField(help_text="(total − reserved) × safety factor − foreign use.")
    allocated = serializers.CharField(help_text="Sum of active reservations.")
    reserved = serializers.CharField(help_text="Held back by staff.")
    available = serializers.CharField(help_text="allocatable − allocated, never below 0.")
    usage_percent = serializers.FloatField(help_text="allocated ÷ allocatable × 100 (0 when nothing is allocatable).")
    total_mb = serializers.IntegerField()
    allocatable_mb = serializers.IntegerField()
    allocated_mb = serializers.IntegerField()
    reserved_mb = serializers.IntegerField()
    available_mb = serializers.IntegerField()
    foreign_used_mb = serializers.IntegerField(help_text="In use by processes WhisperHub did not start.")
    safety_factor = serializers.FloatField()
    used_mb = serializers.IntegerField(allow_null=True, help_text="In use as the driver reports it.")
    utilization_pct = serializers.FloatField(allow_null=True)
    temperature_c = serializers.FloatField(allow_null=True)
    telemetry_at = serializers.DateTimeField(allow_null=True)
    online = serializers.BooleanField(help_text="The device's node reported recently.")
    enabled = serializers.BooleanField()
    draining = serializers.BooleanField()
    node = serializers.CharField()
    index = serializers.IntegerField()
    name = serializers.CharField()
    kind = serializers.ChoiceField(choices=["cuda", "cpu", "simulated"])


class GpuNodeSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    cluster_name = serializers.CharField(help_text="The task queue of this node's cluster.")
    backend = serializers.CharField()
    started_at = serializers.DateTimeField(allow_null=True)
    last_seen = serializers.DateTimeField(allow_null=True)
    online = serializers.BooleanField()


class MemoryStatusSerializer(serializers.Serializer):
    """Marker for the schema: an object keyed by device id (see MemoryStatusSchema)."""


class MemoryStatusSchema(OpenApiSerializerExtension):
    target_class = MemoryStatusSerializer

    def map_serializer(self, auto_schema, direction):
        device = auto_schema.resolve_serializer(DeviceMemorySerializer, direction)
        return {"type": "object", "additionalProperties": device.ref, "description": "Keyed by device id."}


class MemoryStatusApi(APIView):
    """Per device: the ledger's figures (the seed's fields, plus MiB integers) and telemetry."""

    @extend_schema(responses=MemoryStatusSerializer, operation_id="memory_status")
    def get(self, request):
        # One query: devices with their node, and the sum of active allocations.
        devices = devices_with_allocated().order_by("id")
        return Response({str(device.id): DeviceMemorySerializer(device_memory(device)).data for device in devices})


class GpuSerializer(DeviceMemorySerializer):
    id = serializers.IntegerField()
    uuid = serializers.CharField()
    node = GpuNodeSerializer()


class GpuListApi(APIView):
    """Every device with its node: identity, staff settings, telemetry and ledger figures."""

    @extend_schema(responses=GpuSerializer(many=True), operation_id="gpus_list")
    def get(self, request):
        # One query, as for memory_status.
        devices = devices_with_allocated().order_by("node__name", "index")
        rows = [{**device_memory(device), "id": device.id, "uuid": device.uuid, "node": device.node} for device in devices]
        return Response(GpuSerializer(rows, many=True).data)
