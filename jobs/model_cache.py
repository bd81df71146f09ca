"""Whisper models loaded in this worker process, and preloading at worker start.

Each q2 worker is a forked process with its own cache. Only models marked "preload" stay
loaded between jobs: any other model is dropped when its job ends, because memory a
finished job keeps is memory the ledger no longer counts. Preloaded models sit outside the
ledger too; on a GPU the agent sees them as used memory, which is why they are loaded only
when the device has room to spare (the seed's 1.2× rule).

torch and whisper are imported inside the functions: the qcluster parent imports this module
(to connect the worker-start signal) and must never initialise CUDA before it forks. Django is
too, so that bench/executor_gpu_check.py can load models the same way on a machine without it.
"""

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# The seed's rule: preload only when the device has 1.2 × the model's need available.
PRELOAD_HEADROOM = 1.2


@dataclass
class Loaded:
    model: object  # whisper.model.Whisper
    mtime_ns: int  # of the checkpoint when loaded: a replaced file (import --force) is reloaded
    pinned: bool  # preloaded: kept between jobs


_cache: dict[tuple[str, str], Loaded] = {}
_lock = threading.Lock()


def torch_device(device) -> str:
    """The torch device string for a gpus.Device row."""
    from gpus.models import Device

    return f"cuda:{device.index}" if device.kind == Device.Kind.CUDA else "cpu"


def model_get(*, checkpoint: Path, device: str, pin: bool = False) -> tuple[object, float, bool]:
    """Return (model, seconds spent loading, came from cache) for a checkpoint on a torch device."""
    from jobs.whisper_convert import load_whisper_checkpoint

    key = (str(checkpoint), device)
    mtime_ns = checkpoint.stat().st_mtime_ns
    with _lock:
        loaded = _cache.get(key)
        if loaded and loaded.mtime_ns == mtime_ns:
            loaded.pinned |= pin
            return loaded.model, 0.0, True
        started = time.monotonic()
        model = load_whisper_checkpoint(checkpoint, device)
        model.eval()
        seconds = time.monotonic() - started
        _cache[key] = Loaded(model=model, mtime_ns=mtime_ns, pinned=pin)
    logger.info("loaded %s onto %s in %.2f s", checkpoint.name, device, seconds)
    return model, seconds, False


def model_put_back(*, checkpoint: Path, device: str, discard: bool = False) -> None:
    """The job is done with the model: keep it if preloaded (and not `discard`), else free its memory now."""
    key = (str(checkpoint), device)
    with _lock:
        loaded = _cache.get(key)
        if loaded and (discard or not loaded.pinned):
            del _cache[key]
    del loaded
    device_empty_cache(device)


def device_empty_cache(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        with torch.cuda.device(device):
            torch.cuda.empty_cache()


def cached_keys() -> list[tuple[str, str]]:
    with _lock:
        return list(_cache)


def models_preload() -> list[tuple[str, str]]:
    """Load this node's "preload" models where a device has room (1.2 × need available).

    Each model goes to the device of this node with the most memory available; CPU-backed
    devices (cpu, simulated) share the one "cpu" torch device, so a model loads there once.
    """
    from django.conf import settings

    from gpus.models import Device
    from gpus.services import device_grantable, memory_figures
    from jobs.models import WhisperModel

    devices = [
        d for d in Device.objects.select_related("node").filter(node__name=settings.WHISPERHUB_NODE_NAME)
        if device_grantable(d)
    ]
    if not devices:
        return []
    figures = memory_figures([d.id for d in devices])
    loaded = []
    for wm in WhisperModel.objects.filter(preload=True, enabled=True).exclude(checkpoint=""):
        if not wm.installed:
            logger.warning("preload: %s has no checkpoint file at %s", wm.name, wm.checkpoint_path)
            continue
        roomy = [d for d in devices if figures[d.id].available_mb >= PRELOAD_HEADROOM * wm.memory_mb]
        if not roomy:
            logger.info("preload: no device of this node has %.0f MiB available for %s", PRELOAD_HEADROOM * wm.memory_mb, wm.name)
            continue
        best = max(roomy, key=lambda d: figures[d.id].available_mb)
        model_get(checkpoint=wm.checkpoint_path, device=torch_device(best), pin=True)
        loaded.append((wm.name, torch_device(best)))
    return loaded


def on_worker_spawn(sender, proc_name, **kwargs):
    """django_q post_spawn receiver: runs in each freshly forked worker, before its first task."""
    try:
        loaded = models_preload()
    except Exception:  # a failed preload costs a later load, never the worker
        logger.exception("preload failed in %s", proc_name)
        return
    if loaded:
        logger.info("%s preloaded %s", proc_name, ", ".join(f"{name} on {dev}" for name, dev in loaded))
