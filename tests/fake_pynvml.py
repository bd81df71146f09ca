"""A stand-in for the pynvml module, for machines without an NVIDIA GPU.

It answers the calls gpus/backends.py makes with the structures real NVML returns
(pynvml's own c_nvmlMemory_t, c_nvmlUtilization_t, c_nvmlProcessInfo_t turned into its
friendly objects) and raises pynvml's own NVMLError subclasses, so the backend can't tell
the difference. Install with `FakeNvml(...).install(monkeypatch)`.
"""

from dataclasses import dataclass, field

import pynvml

MIB = 1024 * 1024


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA A10"
    total_mb: int = 24576
    used_mb: int = 0
    processes: list[tuple[int, int]] = field(default_factory=list)  # (pid, MiB)
    utilization: int | None = 0  # None: NVML_ERROR_NOT_SUPPORTED
    temperature: int | None = 40


@dataclass(frozen=True)
class _Handle:
    index: int


class FakeNvml:
    # The real module's constants and error classes, so `except pynvml.NVMLError` works unchanged.
    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(self, gpus: list[FakeGpu], *, library_missing: bool = False):
        self.gpus = gpus
        self.library_missing = library_missing
        self.initialised = False

    def install(self, monkeypatch) -> "FakeNvml":
        from gpus import backends

        monkeypatch.setattr(backends, "pynvml", self)
        return self

    def _gpu(self, handle: _Handle) -> FakeGpu:
        if not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        return self.gpus[handle.index]

    def nvmlInit(self):
        if self.library_missing:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        self.initialised = True

    def nvmlShutdown(self):
        self.initialised = False

    def nvmlDeviceGetCount(self):
        if not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < self.nvmlDeviceGetCount():
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(index)

    def nvmlDeviceGetName(self, handle):
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle):
        return self._gpu(handle).uuid

    def nvmlDeviceGetMemoryInfo(self, handle):
        gpu = self._gpu(handle)
        total, used = gpu.total_mb * MIB, gpu.used_mb * MIB
        return pynvml.c_nvmlMemory_t(total=total, free=total - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle):
        gpu = self._gpu(handle)
        if gpu.utilization is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return pynvml.c_nvmlUtilization_t(gpu=gpu.utilization, memory=gpu.utilization // 2)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        gpu = self._gpu(handle)
        if gpu.temperature is None or sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu.temperature

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [
            pynvml.nvmlStructToFriendlyObject(
                pynvml.c_nvmlProcessInfo_t(pid=pid, usedGpuMemory=mb * MIB, gpuInstanceId=0, computeInstanceId=0)
            )
            for pid, mb in self._gpu(handle).processes
        ]
