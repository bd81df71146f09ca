"""The GPU agent against the simulated backend, a pynvml double, and (where present) real NVML."""

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from urllib.parse import quote

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from gpus import backends, services
from gpus.agent import Agent, PARKED_INDEX_START, dispatch_sweep_hook
from gpus.backends import CpuBackend, NvmlBackend, SimulatedBackend, backend_from_settings
from gpus.models import Device, Node
from jobs.models import SchedulerSettings
from tests.fake_pynvml import FakeGpu, FakeNvml

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_dispatch(monkeypatch):
    """Count sweeps instead of dispatching: these tests are about the agent, not the scheduler."""
    import jobs.dispatch

    calls = []
    monkeypatch.setattr(jobs.dispatch, "sweep", lambda: calls.append(time.monotonic()))
    return calls


def sim_agent(spec="sim:24576,24576,81920", node_name="sim-node"):
    return Agent(backend=backend_from_settings(spec, node_name=node_name), node_name=node_name)


def test_the_agent_registers_a_simulated_pool(settings):
    settings.WHISPERHUB_DEFAULT_SAFETY_FACTOR = 0.7
    settings.WHISPERHUB_CLUSTER_NAME = "whisperhub-sim-node"
    node = sim_agent().register()

    assert (node.name, node.cluster_name, node.backend, node.online) == ("sim-node", "whisperhub-sim-node", "sim", True)
    devices = list(node.devices.all())
    assert [(d.index, d.kind, d.total_mb, d.safety_factor) for d in devices] == [
        (0, "simulated", 24576, 0.7),
        (1, "simulated", 24576, 0.7),
        (2, "simulated", 81920, 0.7),
    ]
    # UUIDs are derived from node and index: stable across restarts, distinct across nodes.
    assert [d.uuid for d in devices] == [SimulatedBackend(node_name="sim-node", totals_mb=[1]).device_uuid(i) for i in range(3)]
    assert SimulatedBackend(node_name="other", totals_mb=[1]).device_uuid(0) != devices[0].uuid


def test_simulated_telemetry_mirrors_the_ledger():
    agent = sim_agent()
    agent.register()
    first = agent.node.devices.get(index=0)
    services.allocation_reserve(device_id=first.id, mb=3000)

    agent.report()

    first.refresh_from_db()
    idle = agent.node.devices.get(index=1)
    assert (first.used_mb, first.foreign_used_mb, first.utilization_pct, first.temperature_c) == (3000, 0, 70.0, 63.0)
    assert (idle.used_mb, idle.utilization_pct, idle.temperature_c) == (0, 0.0, 35.0)
    assert first.telemetry_at is not None


def test_staff_settings_survive_a_restart_and_the_total_follows_the_hardware():
    sim_agent().register()
    Device.objects.filter(index=0).update(reserved_mb=2048, safety_factor=0.5, enabled=False, draining=True)

    sim_agent("sim:16384,24576,81920").register()

    device = Device.objects.get(index=0)
    assert (device.reserved_mb, device.safety_factor, device.enabled, device.draining) == (2048, 0.5, False, True)
    assert device.total_mb == 16384
    assert Device.objects.count() == 3


def test_a_device_that_shrinks_below_its_reserve_is_kept_valid():
    sim_agent("sim:24576").register()
    Device.objects.update(reserved_mb=20000)
    sim_agent("sim:16384").register()
    assert Device.objects.get().reserved_mb == 16384


def test_a_vanished_device_is_disabled_and_parked_and_not_granted():
    sim_agent("sim:24576,24576,81920").register()
    gone = Device.objects.get(index=2)

    sim_agent("sim:24576,24576").register()

    gone.refresh_from_db()
    assert not gone.enabled and gone.index >= PARKED_INDEX_START
    with pytest.raises(services.DeviceUnavailable, match="disabled"):
        services.allocation_reserve(device_id=gone.id, mb=100)


def test_gpus_that_swap_slots_keep_their_rows(monkeypatch):
    gpus = [FakeGpu("GPU-aaaa", "NVIDIA A10"), FakeGpu("GPU-bbbb", "NVIDIA A100 80GB PCIe", total_mb=81920)]
    FakeNvml(gpus).install(monkeypatch)
    Agent(backend=NvmlBackend(), node_name="gpu-node").register()
    ids = dict(Device.objects.values_list("uuid", "id"))

    FakeNvml(list(reversed(gpus))).install(monkeypatch)
    Agent(backend=NvmlBackend(), node_name="gpu-node").register()

    assert dict(Device.objects.values_list("uuid", "id")) == ids
    assert dict(Device.objects.values_list("uuid", "index")) == {"GPU-bbbb": 0, "GPU-aaaa": 1}


def test_the_agent_reads_nvml_and_foreign_use_reduces_availability(monkeypatch):
    worker_pid, other_pid = 4242, 4343
    monkeypatch.setattr(backends, "own_pids", lambda: {worker_pid})
    FakeNvml(
        [
            FakeGpu(
                "GPU-1111",
                "NVIDIA A10",
                total_mb=24576,
                # 400 MiB the driver keeps, a WhisperHub worker's 3000, another program's 1500.
                used_mb=4900,
                processes=[(worker_pid, 3000), (other_pid, 1500)],
                utilization=87,
                temperature=71,
            )
        ]
    ).install(monkeypatch)
    agent = Agent(backend=backend_from_settings("nvml", node_name="gpu-node"), node_name="gpu-node")
    agent.register()
    agent.report()

    device = Device.objects.get()
    assert (device.uuid, device.name, device.kind, device.total_mb) == ("GPU-1111", "NVIDIA A10", "cuda", 24576)
    assert (device.used_mb, device.foreign_used_mb, device.utilization_pct, device.temperature_c) == (4900, 1900, 87.0, 71.0)
    figures = services.memory_figures()[device.id]
    assert figures.allocatable_mb == 19660 - 1900  # floor(24576 × 0.8) − foreign
    with pytest.raises(services.InsufficientMemory):
        services.allocation_reserve(device_id=device.id, mb=17761)
    services.allocation_reserve(device_id=device.id, mb=17760)


def test_boards_without_utilisation_or_temperature_report_none(monkeypatch):
    FakeNvml([FakeGpu("GPU-2222", utilization=None, temperature=None)]).install(monkeypatch)
    agent = Agent(backend=NvmlBackend(), node_name="gpu-node")
    agent.register()
    agent.report()
    device = Device.objects.get()
    assert (device.utilization_pct, device.temperature_c, device.used_mb) == (None, None, 0)


def test_auto_picks_nvml_when_a_gpu_answers_and_the_cpu_otherwise(monkeypatch):
    FakeNvml([FakeGpu("GPU-3333")]).install(monkeypatch)
    assert isinstance(backend_from_settings("auto", node_name="n"), NvmlBackend)

    FakeNvml([]).install(monkeypatch)
    assert isinstance(backend_from_settings("auto", node_name="n"), CpuBackend)

    FakeNvml([], library_missing=True).install(monkeypatch)
    assert isinstance(backend_from_settings("auto", node_name="n"), CpuBackend)
    with pytest.raises(ImproperlyConfigured, match="WHISPERHUB_DEVICES=nvml but NVML did not start: NVML Shared Library Not Found"):
        backend_from_settings("nvml", node_name="n")


@pytest.mark.parametrize("spec", ["sim:", "sim:24576,abc", "sim:0", "gpus", "cpu:4", "nvml:1"])
def test_a_malformed_device_setting_says_what_is_expected(spec):
    with pytest.raises(ImproperlyConfigured, match=r"WHISPERHUB_DEVICES=.*(sim:24576,24576,81920)"):
        backend_from_settings(spec, node_name="n")


def test_the_cpu_backend_offers_a_budget_of_the_ram(settings):
    settings.WHISPERHUB_CPU_MEMORY_MB = 4096
    agent = Agent(backend=backend_from_settings("cpu", node_name="cpu-node"), node_name="cpu-node")
    agent.register()
    agent.report()
    device = Device.objects.get()
    assert (device.kind, device.total_mb, device.uuid) == ("cpu", 4096, "cpu-cpu-node")
    assert device.used_mb is not None and 0 <= device.utilization_pct <= 100

    half = backends.meminfo_mb()["MemTotal"] // 2
    assert CpuBackend(node_name="x").discover()[0].total_mb == half


def test_our_workers_are_recognised_by_their_qcluster_ancestor():
    # A real process tree: a "manage.py qcluster" parent and the worker it started.
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, "manage.py", "qcluster"], stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        child_pid = int(parent.stdout.readline())
        ours = backends.own_pids()
        assert {parent.pid, child_pid} <= ours
        assert os.getpid() not in ours
    finally:
        if child_pid:
            os.kill(child_pid, signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_a_node_that_stops_reporting_goes_offline(settings):
    agent = sim_agent()
    agent.register()
    Node.objects.update(last_seen=timezone.now() - timedelta(seconds=settings.WHISPERHUB_NODE_OFFLINE_AFTER + 1))
    assert not Node.objects.get().online
    with pytest.raises(services.DeviceUnavailable, match="offline"):
        services.allocation_reserve(device_id=Device.objects.first().id, mb=1)

    agent.report()
    assert Node.objects.get().online


def test_run_once_reports_and_sweeps_when_due(_no_dispatch):
    SchedulerSettings.objects.update_or_create(pk=1, defaults={"poll_interval_s": 3600})
    agent = sim_agent()

    assert agent.run_once() is True  # registers, reports, sweeps
    assert len(_no_dispatch) == 1
    assert agent.run_once() is False  # nothing due yet

    agent.next_sweep = 0
    assert agent.run_once() is True
    assert len(_no_dispatch) == 2


def test_a_failing_step_costs_one_cycle_not_the_agent(monkeypatch, caplog):
    agent = sim_agent()
    agent.register()
    monkeypatch.setattr(agent.backend, "telemetry", lambda: 1 / 0)

    assert agent.run_once() is True
    assert "agent: telemetry failed" in caplog.text


def test_the_sweep_hook_is_optional(monkeypatch):
    import jobs.dispatch

    assert dispatch_sweep_hook() is jobs.dispatch.sweep
    monkeypatch.delattr(jobs.dispatch, "sweep")
    assert dispatch_sweep_hook() is None
    assert sim_agent().sweep() is False


def test_gpu_agent_once_command(settings, capsys):
    settings.WHISPERHUB_DEVICES = "sim:8192"
    settings.WHISPERHUB_NODE_NAME = "cmd-node"
    call_command("gpu_agent", "--once")
    assert "node cmd-node: 1 device(s) via sim" in capsys.readouterr().out
    assert Device.objects.get().telemetry_at is not None


@pytest.mark.django_db(transaction=True)
def test_the_agent_process_reports_until_sigterm(tmp_path):
    """The real command in its own process, against this test's database, stopped by SIGTERM."""
    db = connection.settings_dict
    # A unix socket directory travels percent-encoded in the host part.
    host = quote(db["HOST"] or db["OPTIONS"].get("host") or "localhost", safe="")
    url = f"postgresql://{quote(db['USER'] or '')}:{quote(db['PASSWORD'] or '')}@{host}:{db['PORT'] or 5432}/{db['NAME']}"
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "WHISPERHUB_DEVICES": "sim:4096,8192",
        "WHISPERHUB_NODE_NAME": "process-node",
        "WHISPERHUB_AGENT_INTERVAL": "0.2",
    }
    log = tmp_path / "agent.log"
    with log.open("w") as stderr:
        agent = subprocess.Popen([sys.executable, "manage.py", "gpu_agent"], env=env, stderr=stderr)
    try:
        seen = _wait_for(lambda: Device.objects.filter(node__name="process-node", telemetry_at__isnull=False).count() == 2)
        assert seen, log.read_text()
        first = Node.objects.get(name="process-node").last_seen
        assert _wait_for(lambda: Node.objects.get(name="process-node").last_seen > first), log.read_text()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=15) == 0, log.read_text()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def _wait_for(condition, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _nvml_gpu_count() -> int:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.gpu
@pytest.mark.skipif(_nvml_gpu_count() == 0, reason="no NVIDIA GPU here: NVML did not start or found no device")
def test_real_nvml():
    agent = Agent(backend=backend_from_settings("nvml", node_name="real-gpu-node"), node_name="real-gpu-node")
    agent.run_once()
    devices = list(Device.objects.filter(node__name="real-gpu-node"))
    assert devices and all(d.kind == "cuda" and d.uuid.startswith(("GPU-", "MIG-")) for d in devices)
    for device in devices:
        assert device.total_mb > 1024
        assert 0 <= device.used_mb <= device.total_mb
        assert 0 <= device.foreign_used_mb <= device.used_mb
        assert device.utilization_pct is None or 0 <= device.utilization_pct <= 100
        assert device.temperature_c is None or 0 < device.temperature_c < 120
    assert services.memory_figures()[devices[0].id].allocatable_mb <= devices[0].total_mb
    # NVML only: the agent must not have created a CUDA context in this process.
    torch = sys.modules.get("torch")
    assert torch is None or not torch.cuda.is_initialized()
