"""Check gpus/backends.py's NVML backend on a real GPU, without a database.

    python bench/nvml_check.py            # prints a JSON report, exits 1 if a check fails

It starts two processes that each hold GPU memory through PyTorch: one whose command line says
`manage.py qcluster` (a WhisperHub worker, "ours") and one that doesn't (foreign). The backend must
count the second, and not the first, as foreign use. This script itself must never touch CUDA.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from django.conf import settings  # noqa: E402

settings.configure()  # the backend module reads no setting until a backend is chosen by name

from gpus import backends  # noqa: E402

HOLD = "import sys, time, torch; x = torch.empty(int(sys.argv[1]) * 2**20, dtype=torch.uint8, device='cuda'); print('ready', flush=True); time.sleep(300)"
OURS_MB, FOREIGN_MB = 2048, 1024


def holder(mb: int, *, ours: bool) -> subprocess.Popen:
    extra = ["manage.py", "qcluster"] if ours else []
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(mb), *extra], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def main() -> int:
    backend = backends.NvmlBackend()
    report = {"devices": [vars(d) for d in backend.discover()], "before": [vars(t) for t in backend.telemetry()]}
    ours, foreign = holder(OURS_MB, ours=True), holder(FOREIGN_MB, ours=False)
    try:
        time.sleep(2)
        pynvml = backends.pynvml
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        report["nvml_processes"] = [
            {"pid": p.pid, "mb": (p.usedGpuMemory or 0) // backends.MIB} for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        ]
        report["pids"] = {"ours": ours.pid, "foreign": foreign.pid, "self": __import__("os").getpid()}
        report["own_pids_has_ours"] = ours.pid in backends.own_pids()
        report["own_pids_has_foreign"] = foreign.pid in backends.own_pids()
        report["after"] = [vars(t) for t in backend.telemetry()]
    finally:
        ours.kill()
        foreign.kill()
        backend.close()
    before, after = report["before"][0], report["after"][0]
    used_delta = after["used_mb"] - before["used_mb"]
    foreign_delta = after["foreign_used_mb"] - before["foreign_used_mb"]
    nvml_pids = {p["pid"] for p in report["nvml_processes"]}
    report["checks"] = {
        "discovered a GPU": bool(report["devices"]) and report["devices"][0]["total_mb"] > 1024,
        "uuid looks like NVML's": report["devices"][0]["uuid"].startswith(("GPU-", "MIG-")),
        "used grew by both holders": used_delta >= OURS_MB + FOREIGN_MB,
        "ours recognised by its command line": report["own_pids_has_ours"] and not report["own_pids_has_foreign"],
        "NVML reports our pid namespace's pids": ours.pid in nvml_pids,
        # With pids visible, only the foreign holder (plus its CUDA context) grows the foreign share.
        "foreign share excludes ours": (foreign_delta < used_delta - OURS_MB + 256) if ours.pid in nvml_pids else None,
        "utilisation and temperature read": after["utilization_pct"] is not None and after["temperature_c"] is not None,
        "this process never loaded torch": "torch" not in sys.modules,
    }
    report["deltas"] = {"used_mb": used_delta, "foreign_used_mb": foreign_delta}
    print(json.dumps(report, indent=2))
    return 1 if any(v is False for v in report["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
