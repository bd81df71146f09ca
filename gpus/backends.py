"""Device backends: which devices this node has, and how busy they are.

One interface (DeviceBackend.discover / .telemetry) behind three kinds, chosen by
settings.WHISPERHUB_DEVICES:
  nvml                 real NVIDIA GPUs through NVML (pynvml). NVML only: never CUDA, so the agent
                       and the qcluster parent stay fork-safe.
  cpu                  the machine's RAM as one device with a budget (WHISPERHUB_CPU_MEMORY_MB,
                       default half the RAM).
  sim:24576,81920      simulated GPUs with those totals in MiB; their work runs on the CPU.
  auto                 nvml when NVML initialises and finds a GPU, else cpu.

"Foreign" memory (used by processes WhisperHub did not start) is what the ledger subtracts from
what it hands out. Our own processes are the qcluster workers on this host: a process counts as
ours when it or one of its ancestors runs `manage.py qcluster` (the cluster forks and spawns its
workers, so their own command line may not say so). Their memory is already covered by their
allocations, so counting it again would halve the pool. Where NVML reports pids this host can't
see (the agent in another container's pid namespace), nothing is recognised as ours: every byte
counts as foreign — wasteful but never over-committed. Run the agent in the workers' pid
namespace (same container, or `pid: host`) to avoid it. docs/LEDGER.md has the details.
"""

import logging
import os
import platform
import uuid
from dataclasses import dataclass

import psutil
import pynvml
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db.models import Count, Q

MIB = 1024 * 1024
WORKER_MARKER = "qcluster"  # the management command our workers run under
SIM_NAMESPACE = uuid.UUID("6f1d9c52-3a07-4c1e-9a39-5d0c3f6b2a11")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    uuid: str
    name: str
    kind: str  # a gpus.models.Device.Kind value
    total_mb: int


@dataclass(frozen=True)
class DeviceTelemetry:
    uuid: str
    used_mb: int
    foreign_used_mb: int
    utilization_pct: float | None
    temperature_c: float | None


class DeviceBackend:
    name = ""

    def discover(self) -> list[DeviceInfo]:
        raise NotImplementedError

    def telemetry(self) -> list[DeviceTelemetry]:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the backend holds (the NVML handle)."""


def own_pids() -> set[int]:
    """Pids on this host that belong to WhisperHub's workers (see the module docstring)."""
    parent, worker = {}, set()
    for process in psutil.process_iter(["pid", "ppid", "cmdline"]):
        parent[process.info["pid"]] = process.info["ppid"]
        if _runs_worker(process.info["cmdline"] or []):
            worker.add(process.info["pid"])
    return {pid for pid in parent if _descends_from(pid, worker, parent)}


def _runs_worker(cmdline: list[str]) -> bool:
    return WORKER_MARKER in cmdline and any(arg.endswith("manage.py") for arg in cmdline)


def _descends_from(pid: int, ancestors: set[int], parent: dict[int, int]) -> bool:
    seen = set()
    while pid and pid not in seen:
        if pid in ancestors:
            return True
        seen.add(pid)
        pid = parent.get(pid, 0)
    return False


class NvmlBackend(DeviceBackend):
    name = "nvml"

    def __init__(self):
        pynvml.nvmlInit()  # raises pynvml.NVMLError without a driver or library

    def _handles(self):
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    def discover(self) -> list[DeviceInfo]:
        return [
            DeviceInfo(
                index=index,
                uuid=pynvml.nvmlDeviceGetUUID(handle),
                name=pynvml.nvmlDeviceGetName(handle),
                kind="cuda",
                total_mb=pynvml.nvmlDeviceGetMemoryInfo(handle).total // MIB,
            )
            for index, handle in enumerate(self._handles())
        ]

    def telemetry(self) -> list[DeviceTelemetry]:
        ours = own_pids()
        return [self._device_telemetry(handle, ours) for handle in self._handles()]

    def _device_telemetry(self, handle, ours: set[int]) -> DeviceTelemetry:
        used_mb = pynvml.nvmlDeviceGetMemoryInfo(handle).used // MIB
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        # usedGpuMemory is None where the driver can't tell (WDDM): such a process counts as 0 here,
        # so its memory stays in the foreign share, the safe side.
        own_mb = sum(p.usedGpuMemory or 0 for p in processes if p.pid in ours) // MIB
        return DeviceTelemetry(
            uuid=pynvml.nvmlDeviceGetUUID(handle),
            used_mb=used_mb,
            foreign_used_mb=max(0, used_mb - own_mb),
            utilization_pct=_optional(lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
            temperature_c=_optional(
                lambda: float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
            ),
        )

    def close(self) -> None:
        pynvml.nvmlShutdown()


def _optional(read):
    """Some boards don't report utilisation or temperature (NVML_ERROR_NOT_SUPPORTED): show none."""
    try:
        return read()
    except pynvml.NVMLError:
        return None


def meminfo_mb() -> dict[str, int]:
    """/proc/meminfo in MiB (it reports kB)."""
    values = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) // 1024
    return values


class CpuBackend(DeviceBackend):
    """The host's RAM as one device. Its budget is the device's total; memory other programs use
    beyond the rest of the RAM eats into the budget and counts as foreign."""

    name = "cpu"

    def __init__(self, *, node_name: str, budget_mb: int = 0):
        self.node_name = node_name
        self.budget_mb = budget_mb or meminfo_mb()["MemTotal"] // 2

    def discover(self) -> list[DeviceInfo]:
        return [
            DeviceInfo(index=0, uuid=f"cpu-{self.node_name}", name=_cpu_name(), kind="cpu", total_mb=self.budget_mb)
        ]

    def telemetry(self) -> list[DeviceTelemetry]:
        memory = meminfo_mb()
        own_mb = _rss_mb(own_pids())
        others_mb = max(0, memory["MemTotal"] - memory["MemAvailable"] - own_mb)
        foreign_mb = max(0, others_mb - (memory["MemTotal"] - self.budget_mb))
        load = os.getloadavg()[0] / (os.cpu_count() or 1) * 100
        return [
            DeviceTelemetry(
                uuid=f"cpu-{self.node_name}",
                used_mb=own_mb + foreign_mb,  # the part of the budget in use
                foreign_used_mb=foreign_mb,
                utilization_pct=round(min(100.0, load), 1),
                temperature_c=_cpu_temperature(),
            )
        ]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return "CPU: " + line.partition(":")[2].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


def _rss_mb(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total // MIB


def _cpu_temperature() -> float | None:
    readings = [t.current for sensors in psutil.sensors_temperatures().values() for t in sensors if t.current]
    return max(readings) if readings else None


class SimulatedBackend(DeviceBackend):
    """Declared GPUs for development, demos, tests and benchmarks.

    Their telemetry mirrors the ledger: used = allocated, each running allocation keeps a
    device 70 % busy (two saturate it), and the temperature follows the load (35 °C idle, 75 °C full).
    """

    name = "sim"
    BUSY_PER_ALLOCATION = 70.0

    def __init__(self, *, node_name: str, totals_mb: list[int]):
        self.node_name = node_name
        self.totals_mb = totals_mb

    def device_uuid(self, index: int) -> str:
        return f"SIM-{uuid.uuid5(SIM_NAMESPACE, f'{self.node_name}:{index}')}"

    def discover(self) -> list[DeviceInfo]:
        return [
            DeviceInfo(
                index=index,
                uuid=self.device_uuid(index),
                name=f"Simulated GPU {total / 1024:.0f} GiB",
                kind="simulated",
                total_mb=total,
            )
            for index, total in enumerate(self.totals_mb)
        ]

    def telemetry(self) -> list[DeviceTelemetry]:
        from gpus.services import devices_with_allocated  # here: bench/nvml_check.py imports this module without apps

        uuids = [self.device_uuid(index) for index in range(len(self.totals_mb))]
        rows = devices_with_allocated().filter(uuid__in=uuids).annotate(
            running=Count("allocations", filter=Q(allocations__released_at__isnull=True))
        )
        ledger = {row.uuid: (row.allocated_mb, row.running) for row in rows}
        telemetry = []
        for device_uuid in uuids:
            allocated, running = ledger.get(device_uuid, (0, 0))
            utilization = min(100.0, self.BUSY_PER_ALLOCATION * running)
            telemetry.append(
                DeviceTelemetry(
                    uuid=device_uuid,
                    used_mb=allocated,
                    foreign_used_mb=0,
                    utilization_pct=utilization,
                    temperature_c=35.0 + 0.4 * utilization,
                )
            )
        return telemetry


DEVICES_HELP = "expected auto, nvml, cpu or sim:<MiB>[,<MiB>…] (e.g. sim:24576,24576,81920)"


def backend_from_settings(spec: str | None = None, *, node_name: str | None = None) -> DeviceBackend:
    """The backend WHISPERHUB_DEVICES names; ImproperlyConfigured with the reason when it can't be had."""
    spec = (settings.WHISPERHUB_DEVICES if spec is None else spec).strip()
    node_name = node_name or settings.WHISPERHUB_NODE_NAME
    kind, _, arguments = spec.partition(":")
    kind = kind.lower()
    if kind in ("sim", "simulated"):
        return SimulatedBackend(node_name=node_name, totals_mb=_sim_totals(spec, arguments))
    if arguments:
        raise ImproperlyConfigured(f"WHISPERHUB_DEVICES={spec!r}: {DEVICES_HELP}")
    if kind == "cpu":
        return CpuBackend(node_name=node_name, budget_mb=settings.WHISPERHUB_CPU_MEMORY_MB)
    if kind == "nvml":
        try:
            return NvmlBackend()
        except pynvml.NVMLError as exc:
            raise ImproperlyConfigured(f"WHISPERHUB_DEVICES=nvml but NVML did not start: {exc}") from None
    if kind == "auto":
        return _auto(node_name)
    raise ImproperlyConfigured(f"WHISPERHUB_DEVICES={spec!r}: {DEVICES_HELP}")


def _sim_totals(spec: str, arguments: str) -> list[int]:
    try:
        totals = [int(part) for part in arguments.split(",")]
    except ValueError:
        totals = []
    if not totals or any(total <= 0 for total in totals):
        raise ImproperlyConfigured(
            f"WHISPERHUB_DEVICES={spec!r}: a simulated pool needs one positive total in MiB per GPU, "
            "e.g. sim:24576,24576,81920"
        )
    return totals


def _auto(node_name: str) -> DeviceBackend:
    try:
        backend = NvmlBackend()
    except pynvml.NVMLError as exc:
        logger.info("devices: NVML unavailable (%s), using the CPU", exc)
    else:
        if pynvml.nvmlDeviceGetCount() > 0:
            return backend
        backend.close()
        logger.info("devices: NVML found no GPU, using the CPU")
    return CpuBackend(node_name=node_name, budget_mb=settings.WHISPERHUB_CPU_MEMORY_MB)
