"""Check the executor's CUDA path on a machine with an NVIDIA GPU, without Django or a database.

What a q2 worker does, with the same functions (jobs/model_cache.py, jobs/whisper_run.py):
  1. The parent imports torch and the executor's modules and forks, as `manage.py qcluster`
     does; it must not have initialised CUDA (else: "Cannot re-initialize CUDA in forked
     subprocess"). Two workers are forked one after the other.
  2. Each worker loads the checkpoint onto cuda:0 (timed; a second get comes from the cache),
     transcribes the speech with fp16 and beam 5 through whisper_hooks (progress and per-token
     step callbacks), and reports speed and word error rate.
  3. A stop raised from the per-token hook leaves transcribe() at once (cancel/timeout path).
  4. Putting the model back (discard) and emptying the cache returns the memory.
  5. A real CUDA out-of-memory error is recognised by is_out_of_memory.

    python3 bench/executor_gpu_check.py --checkpoint .gpu/tiny.en.int8.pt --audio .gpu/speech.wav \
        --reference-file bench/gpu_speech.txt --out /tmp/out

A checkpoint packed by bench/pack_checkpoint.py is unpacked first. Without CUDA it runs on the
CPU (to check the script itself) and says so.
"""

import argparse
import gc
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def numba_or_stand_in() -> None:
    """whisper imports numba at import time but needs it only for word timestamps on the CPU."""
    try:
        import numba  # noqa: F401
    except Exception as exc:  # an image whose numba refuses its numpy
        import types

        print(f"numba unavailable ({exc}); no-op stand-in", flush=True)
        stand_in = types.ModuleType("numba")
        stand_in.jit = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f))
        sys.modules["numba"] = stand_in


class Stop(Exception):
    pass


def worker(name: str, checkpoint: str, audio: str, reference: str, device: str, queue) -> None:
    import torch

    from jobs import model_cache, whisper_run
    from tests.wer import wer

    report = {"worker": name, "device": device}
    try:
        if device.startswith("cuda"):
            report["gpu"] = torch.cuda.get_device_name(device)
        path = Path(checkpoint)
        model, report["load_s"], cached = model_cache.model_get(checkpoint=path, device=device)
        assert not cached
        again, again_s, cached = model_cache.model_get(checkpoint=path, device=device)
        assert again is model
        del again
        report["second_get_cached"], report["second_get_s"] = cached, again_s
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            report["allocated_after_load_mb"] = torch.cuda.memory_allocated() / 2**20

        samples = read_audio(audio, whisper_run)
        report["audio_s"] = round(len(samples) / 16000, 2)
        options = dict(language="en", task="transcribe", temperature=0.0, beam_size=5, fp16=device.startswith("cuda"), verbose=None)
        progress, steps = [], [0]

        def step():
            steps[0] += 1

        started = time.monotonic()
        with whisper_run.whisper_hooks(model, on_progress=progress.append, on_step=step):
            result = model.transcribe(samples, **options)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        report["transcribe_s"] = round(time.monotonic() - started, 3)
        report["realtime_factor"] = round(report["audio_s"] / report["transcribe_s"], 1)
        report["decoder_steps"], report["progress"] = steps[0], [round(p, 3) for p in progress]
        report["text"] = result["text"].strip()
        report["wer"] = round(wer(reference, report["text"]), 3)
        report["peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None

        def stop_after_ten():
            steps[0] += 1
            if steps[0] > 10:
                raise Stop()

        steps[0] = 0
        started = time.monotonic()
        try:
            with whisper_run.whisper_hooks(model, on_progress=lambda f: None, on_step=stop_after_ten):
                model.transcribe(samples, **options)
            report["stop_from_hook"] = "not raised"
        except Stop:
            report["stop_from_hook"] = f"left transcribe after {steps[0]} steps, {time.monotonic() - started:.3f} s"

        del model, result
        model_cache.model_put_back(checkpoint=path, device=device, discard=True)
        gc.collect()
        if device.startswith("cuda"):
            model_cache.device_empty_cache(device)
            report["allocated_after_put_back_mb"] = torch.cuda.memory_allocated() / 2**20
            report["reserved_after_put_back_mb"] = torch.cuda.memory_reserved() / 2**20
            try:
                torch.empty(1 << 40, dtype=torch.uint8, device=device)  # 1 TiB: no card has it
                report["oom"] = "no error"
            except Exception as exc:
                report["oom"] = {"type": type(exc).__name__, "is_out_of_memory": whisper_run.is_out_of_memory(exc)}
        report["ok"] = True
    except Exception:  # reported, not raised: the parent prints every worker's outcome
        import traceback

        report["ok"], report["error"] = False, traceback.format_exc()
    queue.put(report)


def read_audio(path: str, whisper_run):
    """Through ffmpeg as the executor does; a GPU image without ffmpeg reads the 16 kHz wav directly."""
    import shutil
    import wave

    import numpy as np

    if shutil.which("ffmpeg"):
        return whisper_run.decode_audio(path)
    with wave.open(path) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2), "needs 16 kHz mono s16"
        return np.frombuffer(wav.readframes(wav.getnframes()), np.int16).astype(np.float32) / 32768.0


def unpack_to(checkpoint: str, path: str) -> None:
    import torch

    from bench.pack_checkpoint import is_packed, unpack

    data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    torch.save(unpack(data) if is_packed(data) else data, path)


def unpacked(checkpoint: Path, workdir: Path, context) -> Path:
    """Unpack in a child: tensor work in the parent would start torch's CPU thread pool, and a
    child forked after that hangs in its first parallel op (the qcluster parent must not either)."""
    path = workdir / "unpacked.pt"
    process = context.Process(target=unpack_to, args=(str(checkpoint), str(path)))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"unpacking {checkpoint} failed")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--audio", required=True)
    parser.add_argument("--reference-file", required=True)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    numba_or_stand_in()
    # Without this, torch.cuda.is_available() asks the CUDA runtime for the device count, which
    # poisons every later fork ("Cannot re-initialize CUDA in forked subprocess") though no
    # context was created. The NVML-based check is fork-safe.
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    import torch

    from jobs import model_cache, whisper_run  # noqa: F401 - imported before the fork, as in qcluster

    context = multiprocessing.get_context("fork")
    checkpoint = unpacked(Path(args.checkpoint), Path(tempfile.mkdtemp()), context)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    # get_device_name would create a context: the workers name the GPU.
    summary = {"torch": torch.__version__, "device": device}
    summary["parent_cuda_initialized_before_fork"] = torch.cuda.is_initialized()
    queue = context.Queue()
    reports = []
    for name in ("worker-1", "worker-2"):
        process = context.Process(target=worker, args=(name, str(checkpoint), args.audio, Path(args.reference_file).read_text(), device, queue))
        process.start()
        reports.append(queue.get(timeout=150))
        process.join()
        reports[-1]["exitcode"] = process.exitcode
    summary["parent_cuda_initialized_after"] = torch.cuda.is_initialized()
    summary["workers"] = reports
    (out / "executor_gpu_check.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    ok = all(r["ok"] for r in reports) and not summary["parent_cuda_initialized_after"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
