"""Measure Whisper's GPU memory against the ledger's estimates, on a machine with an NVIDIA GPU.

For each model size, in a fresh process per model (each WhisperHub worker has its own CUDA
context, so a fresh process is what the ledger must cover), on cuda:0:
  - real weights where `--checkpoint NAME=PATH` gives a checkpoint (plain, or packed by
    bench/pack_checkpoint.py) — transcribes `--audio` as the executor does;
  - otherwise the official dimensions with random weights ("dims-only (memory only)": memory
    depends on shapes, not values) — decodes one 30 s window, worst case: the context filled
    with a 223-token prompt, end-of-text suppressed so all beams run to the context's end.
Parameters in float32, as openai-whisper and WhisperHub's load_whisper_checkpoint load them
(compute is float16); `--weights fp32,fp16` adds a float16-parameter run (model.half()).
Memory: torch.cuda.max_memory_allocated/reserved and NVML (this process, and the device)
before load, after load, and at the peak, sampled every 20 ms while transcribing. Then
K processes transcribe concurrently on the one GPU and their NVML total is set against the
sum of their estimates. Results: a markdown table on stdout, results.json and gpu_check.md
in `--out`.

Runs without Django or a database: imports torch, numpy, whisper, pynvml, the standard
library, and jobs/whisper_convert.py, bench/pack_checkpoint.py and tests/wer.py by path.
The ledger's figures come from `--estimates` (bench/catalog_estimates.py: the catalog after
every migration) or else from jobs/migrations/0002_seed_catalog.py and jobs/models.py, read
with `ast`. Where no CUDA GPU exists it says so and exits 0.

    python3 bench/gpu_check.py --audio speech.wav --reference-file speech.txt \
        --checkpoint tiny.en=.gpu/tiny.en.int8.pt --out /tmp/gpu
"""

import argparse
import ast
import gc
import importlib.util
import json
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
import wave
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch


def _numba_or_stand_in() -> None:
    """whisper imports numba at import time but uses it only for word timestamps on the CPU.

    A GPU image whose numba refuses its numpy would stop whisper from importing at all; a
    stand-in `jit` that returns the function unchanged keeps this (word-timestamp-free) check running.
    """
    try:
        import numba  # noqa: F401
    except ImportError as exc:
        import types

        print(f"numba unavailable ({exc}); using a no-op stand-in (no word timestamps here)", flush=True)
        stand_in = types.ModuleType("numba")
        stand_in.jit = lambda *args, **kwargs: (args[0] if args and callable(args[0]) else (lambda f: f))
        sys.modules["numba"] = stand_in


_numba_or_stand_in()

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
NO_GPU = "no NVIDIA GPU: nothing measured"
SAMPLE_RATE = 16000
SAMPLE_INTERVAL_S = 0.02
BARRIER_TIMEOUT_S = 180

# openai-whisper's published model dimensions (the "dims" inside its official checkpoints).
_COMMON = dict(n_audio_ctx=1500, n_text_ctx=448)
_LARGE = dict(_COMMON, n_audio_state=1280, n_audio_head=20, n_audio_layer=32,
              n_text_state=1280, n_text_head=20, n_text_layer=32)
OFFICIAL_DIMS = {
    "tiny": dict(_COMMON, n_mels=80, n_vocab=51865, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
                 n_text_state=384, n_text_head=6, n_text_layer=4),
    "base": dict(_COMMON, n_mels=80, n_vocab=51865, n_audio_state=512, n_audio_head=8, n_audio_layer=6,
                 n_text_state=512, n_text_head=8, n_text_layer=6),
    "small": dict(_COMMON, n_mels=80, n_vocab=51865, n_audio_state=768, n_audio_head=12, n_audio_layer=12,
                  n_text_state=768, n_text_head=12, n_text_layer=12),
    "medium": dict(_COMMON, n_mels=80, n_vocab=51865, n_audio_state=1024, n_audio_head=16, n_audio_layer=24,
                   n_text_state=1024, n_text_head=16, n_text_layer=24),
    "large-v2": dict(_LARGE, n_mels=80, n_vocab=51865),
    "large-v3": dict(_LARGE, n_mels=128, n_vocab=51866),
    "turbo": dict(_LARGE, n_mels=128, n_vocab=51866, n_text_layer=4),  # large-v3, 4 decoder layers
}
DEFAULT_SIZES = list(OFFICIAL_DIMS)
DEFAULT_CONCURRENT = ["base:4", "large-v3:4"]
WEIGHT_LABELS = {
    "fp32": "fp32 params (as WhisperHub loads), fp16 compute",
    "fp16": "fp16 params (model.half(), norms fp32)",
}
# Used only if jobs/models.py can't be parsed: SchedulerSettings.inference_multiplier's default.
FALLBACK_MULTIPLIER = 1.5


def load_module(relative_path: str, name: str):
    """Import a repository file by path: no package imports, so no Django."""
    spec = importlib.util.spec_from_file_location(name, REPO / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the ledger's estimates

def _literal_assignments(path: Path) -> dict:
    values = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return values


def _inference_multiplier() -> float:
    """SchedulerSettings.inference_multiplier's default, read from jobs/models.py."""
    try:
        tree = ast.parse((REPO / "jobs/models.py").read_text())
    except OSError:
        return FALLBACK_MULTIPLIER
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "inference_multiplier" for t in node.targets)
                and isinstance(node.value, ast.Call)):
            for keyword in node.value.keywords:
                if keyword.arg == "default":
                    return float(ast.literal_eval(keyword.value))
    return FALLBACK_MULTIPLIER


def ledger_estimates() -> dict:
    """{"multiplier", "need_mb": {model: MiB}} as the seed migration and settings define them.

    Later migrations that change a need are not seen here: bench/catalog_estimates.py writes the
    catalog as every migration leaves it, for --estimates.
    """
    seed = _literal_assignments(REPO / "jobs/migrations/0002_seed_catalog.py")
    need = {name: gb * seed["GIB"] for name, gb, _english in seed["SEED_MODELS"]}
    return {"multiplier": _inference_multiplier(), "need_mb": need,
            "source": "jobs/migrations/0002_seed_catalog.py SEED_MODELS × jobs/models.py inference_multiplier"}


def estimate_mb(estimates: dict, name: str) -> float | None:
    need = estimates["need_mb"].get(name)
    return None if need is None else need * estimates["multiplier"]


# ---------------------------------------------------------------- audio

def read_wav(path: str) -> np.ndarray:
    """A PCM wav as float32 mono at 16 kHz (no ffmpeg: the GPU machine may lack it)."""
    with wave.open(str(path), "rb") as w:
        rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        raw = w.readframes(w.getnframes())
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        dtype = np.int16 if width == 2 else np.int32
        samples = np.frombuffer(raw, dtype).astype(np.float32) / np.iinfo(dtype).max
    else:
        raise ValueError(f"{path}: {8 * width}-bit PCM is not supported (use 16-bit)")
    samples = samples.reshape(-1, channels).mean(axis=1)
    if rate != SAMPLE_RATE:  # linear interpolation: good enough for a memory benchmark
        positions = np.arange(0, len(samples), rate / SAMPLE_RATE)
        samples = np.interp(positions, np.arange(len(samples)), samples)
    return samples.astype(np.float32)


# ---------------------------------------------------------------- memory probes

class Nvml:
    """Used memory of one GPU and of the processes on it; None where NVML can't tell."""

    def __init__(self, index: int):
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def device_mb(self) -> float | None:
        try:
            return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / MIB
        except self.nvml.NVMLError:
            return None

    def processes_mb(self) -> dict[int, float]:
        try:
            processes = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except self.nvml.NVMLError:
            return {}
        return {p.pid: p.usedGpuMemory / MIB for p in processes if isinstance(p.usedGpuMemory, int)}

    def describe(self) -> dict:
        n = self.nvml
        info = {"name": n.nvmlDeviceGetName(self.handle), "total_mb": n.nvmlDeviceGetMemoryInfo(self.handle).total / MIB}
        for key, call in (("driver", n.nvmlSystemGetDriverVersion), ("nvml", n.nvmlSystemGetNVMLVersion)):
            try:
                info[key] = call()
            except n.NVMLError:
                info[key] = None
        return {k: v.decode() if isinstance(v, bytes) else v for k, v in info.items()}


class NoNvml:
    """Stands in for Nvml on a CPU smoke run or where pynvml is missing: every figure is None."""

    def device_mb(self):
        return None

    def processes_mb(self):
        return {}


def open_nvml(index: int):
    try:
        return Nvml(index)
    except Exception as exc:  # pynvml missing, or no driver: measure what torch can
        print(f"NVML unavailable ({type(exc).__name__}: {exc}); NVML columns stay empty", flush=True)
        return NoNvml()


class PeakSampler:
    """A thread reading NVML every 20 ms; keeps the device's and each process's maximum."""

    def __init__(self, probe, pids=()):
        self.probe, self.pids = probe, set(pids)
        self.device_peak, self.process_peak = None, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self):
        used = self.probe.device_mb()
        if used is not None:
            self.device_peak = max(used, self.device_peak or 0.0)
        for pid, mb in self.probe.processes_mb().items():
            if not self.pids or pid in self.pids:
                self.process_peak[pid] = max(mb, self.process_peak.get(pid, 0.0))

    def _loop(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(SAMPLE_INTERVAL_S)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def snapshot(probe, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "nvml_process_mb": probe.processes_mb().get(os.getpid()),
        "nvml_device_mb": probe.device_mb(),
        "torch_allocated_mb": torch.cuda.memory_allocated(device) / MIB if cuda else None,
        "torch_reserved_mb": torch.cuda.memory_reserved(device) / MIB if cuda else None,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- one model in one process

def keep_norms_fp32(model) -> None:
    """whisper's LayerNorm runs in float32 (x.float()); a float16 weight there would mismatch."""
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.float()


def build_random(dims: dict, device: torch.device, weights: str):
    """The official architecture with random weights, created directly on `device`.

    Built in place on the GPU: initialising large-v3's 1.5 G parameters on the CPU and then
    copying them would take far longer than the measurement itself.
    """
    from whisper.model import ModelDimensions, Whisper

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16 if weights == "fp16" else torch.float32)
    try:
        with torch.device(device):
            model = Whisper(ModelDimensions(**dims))
    except RuntimeError as exc:  # an op without a kernel there: slower, but still measures
        print(f"building on {device} failed ({exc}); building on the CPU and copying", flush=True)
        model = Whisper(ModelDimensions(**dims)).to(device)
    finally:
        torch.set_default_dtype(previous)
    if weights == "fp16":
        keep_norms_fp32(model)
    return model.eval()


def load_model(spec: dict, device: torch.device, weights: str):
    if spec["kind"] == "dims":
        return build_random(spec["dims"], device, weights)
    convert = load_module("jobs/whisper_convert.py", "whisper_convert")
    model = convert.load_whisper_checkpoint(spec["path"], device).eval()  # WhisperHub's own loader
    if weights == "fp16":
        model.half()
        keep_norms_fp32(model)
    return model


def transcribe_real(model, audio: np.ndarray, cuda: bool) -> dict:
    """The executor's call (jobs/executor.py decode_options) with temperature 0 and beam 5."""
    result = model.transcribe(audio, temperature=0.0, beam_size=5, fp16=cuda, verbose=None)
    return {"text": result["text"].strip(), "tokens": sum(len(s["tokens"]) for s in result["segments"])}


def decode_worst_case(model, audio: np.ndarray, cuda: bool, sample_len: int) -> dict:
    """One 30 s window, beam 5, the text context filled: the most memory one window can take.

    A 223-token prompt (as condition_on_previous_text can supply) plus end-of-text suppressed,
    so random weights can neither stop early nor run away: whisper stops at the 448-token
    context, or after `sample_len` tokens.
    """
    import whisper
    from whisper.tokenizer import get_tokenizer

    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)), n_mels=model.dims.n_mels)
    tokenizer = get_tokenizer(model.is_multilingual, num_languages=model.num_languages)
    n_ctx = model.dims.n_text_ctx
    options = whisper.DecodingOptions(
        language="en", beam_size=5, fp16=cuda, sample_len=sample_len, without_timestamps=True,
        suppress_tokens=[-1, tokenizer.eot], prompt=list(range(1000, 1000 + n_ctx // 2 - 1)),
    )
    result = whisper.decode(model, mel.to(model.device), options)
    return {"text": result.text.strip()[:80], "tokens": len(result.tokens)}


def measure_variant(spec: dict, device: torch.device, weights: str, probe, audio, barrier) -> dict:
    cuda = device.type == "cuda"
    row = {"weights": weights, "before_load": snapshot(probe, device)}
    started = time.perf_counter()
    model = load_model(spec, device, weights)
    synchronize(device)
    row["load_s"] = time.perf_counter() - started
    if cuda:
        torch.cuda.empty_cache()  # drop what loading left behind (a float32 copy before .half())
    row["after_load"] = snapshot(probe, device)
    row["params"] = sum(p.numel() for p in model.parameters())
    if barrier is not None:
        barrier.wait(BARRIER_TIMEOUT_S)  # concurrent runs transcribe together
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with PeakSampler(probe, [os.getpid()]) as sampler:
        row["run_s"] = []
        for _ in range(spec["repeats"]):
            started = time.perf_counter()
            if spec["kind"] == "dims":
                row["output"] = decode_worst_case(model, audio, cuda, spec["sample_len"])
            else:
                row["output"] = transcribe_real(model, audio, cuda)
            synchronize(device)
            row["run_s"].append(time.perf_counter() - started)
    row["peak"] = {
        "nvml_process_mb": sampler.process_peak.get(os.getpid()),
        "nvml_device_mb": sampler.device_peak,
        "torch_allocated_mb": torch.cuda.max_memory_allocated(device) / MIB if cuda else None,
        "torch_reserved_mb": torch.cuda.max_memory_reserved(device) / MIB if cuda else None,
    }
    if barrier is not None:
        barrier.wait(BARRIER_TIMEOUT_S)  # hold the memory until every run has peaked
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def measure_process(spec: dict, barrier) -> dict:
    device = torch.device(spec["device"])
    probe = open_nvml(spec["nvml_index"]) if device.type == "cuda" else NoNvml()
    audio = read_wav(spec["audio"])
    out = {"pid": os.getpid(), "started": snapshot(probe, device)}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.zeros(1, device=device)  # create the CUDA context: its cost is part of a worker's
        synchronize(device)
    out["context"] = snapshot(probe, device)
    out["variants"] = [measure_variant(spec, device, w, probe, audio, barrier) for w in spec["weights"]]
    return out


def child_main(spec: dict, barrier, results, slot: int) -> None:
    """Entry point of a spawned process; always answers on `results`."""
    try:
        result = measure_process(spec, barrier)
    except BaseException as exc:
        if barrier is not None:
            barrier.abort()  # don't leave the other runs waiting
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
    results.put((slot, result))


# ---------------------------------------------------------------- orchestration (parent: no CUDA)

def run_processes(spec: dict, count: int, timeout_s: float, probe) -> dict:
    """Run `count` copies of spec in spawned processes; NVML is sampled here throughout."""
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    barrier = ctx.Barrier(count) if count > 1 else None
    baseline = probe.device_mb()
    started = time.perf_counter()
    answers = {}
    with PeakSampler(probe) as sampler:
        procs = [ctx.Process(target=child_main, args=(spec, barrier, results, i), daemon=True) for i in range(count)]
        for p in procs:
            p.start()
        deadline = started + timeout_s
        while len(answers) < count and time.perf_counter() < deadline:
            try:
                slot, answer = results.get(timeout=max(0.1, min(5.0, deadline - time.perf_counter())))
                answers[slot] = answer
            except Exception:  # queue.Empty: check the deadline and whether anyone died
                if not any(p.is_alive() for p in procs) and results.empty():
                    break
        for i, p in enumerate(procs):
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
            answers.setdefault(i, {"error": f"no answer within {timeout_s:.0f} s (exit code {p.exitcode})"})
    return {
        "wall_s": time.perf_counter() - started,
        "device_baseline_mb": baseline,
        "device_peak_mb": sampler.device_peak,
        "process_peaks_mb": {str(pid): mb for pid, mb in sampler.process_peak.items()},
        "processes": [answers[i] for i in range(count)],
    }


def verdict(measured: float | None, estimate: float | None) -> dict:
    if measured is None or estimate is None:
        return {"ratio": None, "covered": None, "verdict": "not measured" if measured is None else "no estimate"}
    ratio = measured / estimate
    if measured <= estimate:
        text = f"covered, margin {estimate - measured:.0f} MiB ({(1 - ratio) * 100:.0f}%)"
    else:
        text = f"NOT covered: short by {measured - estimate:.0f} MiB"
    return {"ratio": ratio, "covered": measured <= estimate, "verdict": text}


def single_rows(name: str, spec: dict, outcome: dict, estimate: float | None, audio_s: float) -> list[dict]:
    answer = outcome["processes"][0]
    base = {"model": name, "label": spec["label"], "estimate_mb": estimate}
    if "error" in answer:
        return [dict(base, weights=",".join(spec["weights"]), error=answer["error"], traceback=answer.get("traceback"))]
    rows = []
    for i, v in enumerate(answer["variants"]):
        measured = v["peak"]["nvml_process_mb"]
        source = "NVML process peak"
        if measured is None and v["peak"]["nvml_device_mb"] is not None and outcome["device_baseline_mb"] is not None:
            measured, source = v["peak"]["nvml_device_mb"] - outcome["device_baseline_mb"], "NVML device peak − baseline"
        row = dict(base, weights=v["weights"], params=v["params"], load_s=v["load_s"], run_s=v["run_s"],
                   rtf=min(v["run_s"]) / audio_s if spec["kind"] == "checkpoint" else None,
                   context=answer["context"], before_load=v["before_load"], after_load=v["after_load"],
                   peak=v["peak"], output=v["output"], measured_mb=measured, measured_source=source,
                   same_process_as_previous=i > 0, **verdict(measured, estimate))
        if spec.get("reference") and spec["kind"] == "checkpoint":
            row["wer"] = load_module("tests/wer.py", "wer").wer(spec["reference"], v["output"]["text"])
        rows.append(row)
    return rows


def concurrent_row(name: str, count: int, spec: dict, outcome: dict, estimate: float | None) -> dict:
    errors = [p["error"] for p in outcome["processes"] if "error" in p]
    peak, baseline = outcome["device_peak_mb"], outcome["device_baseline_mb"]
    measured = None if peak is None or baseline is None else peak - baseline
    total_estimate = None if estimate is None else count * estimate
    row = {"model": name, "label": spec["label"], "count": count, "estimate_each_mb": estimate,
           "estimate_sum_mb": total_estimate, "device_peak_minus_baseline_mb": measured,
           "sum_process_peaks_mb": sum(outcome["process_peaks_mb"].values()) or None,
           "wall_s": outcome["wall_s"], "errors": errors,
           "run_s": [v["run_s"][0] for p in outcome["processes"] if "variants" in p for v in p["variants"]]}
    return dict(row, **verdict(measured, total_estimate))


# ---------------------------------------------------------------- report

def fmt(value, digits=0):
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


def render_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check — {env['date']}", ""]
    if report.get("message"):
        lines += [report["message"], ""]
    gpu = env.get("gpu") or {}
    lines += [f"- GPU: {gpu.get('name', '–')}, {fmt(gpu.get('total_mb'))} MiB, driver {gpu.get('driver', '–')}",
              f"- torch {env['torch']} (CUDA {env['cuda']}), whisper {env.get('whisper', '–')}, Python {env['python']}",
              f"- ledger estimate = catalog need × inference multiplier {report['estimates']['multiplier']} "
              f"({report['estimates']['source']})",
              "- measured = peak NVML memory of the worker process (CUDA context included), sampled every 20 ms", ""]
    if report["single"]:
        lines += ["| model | weights | params | load s | run s | RTF | torch peak alloc | torch peak reserved "
                  "| NVML process peak | estimate | measured/estimate | verdict | output |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["single"]:
            if "error" in r:
                lines.append(f"| {r['model']} ({r['label']}) | {r['weights']} | | | | | | | | {fmt(r['estimate_mb'])} | | "
                             f"ERROR: {r['error'][:120]} | |")
                continue
            output = f"WER {r['wer']:.2f}" if r.get("wer") is not None else f"{r['output']['tokens']} tokens"
            lines.append(
                f"| {r['model']} ({r['label']}) | {WEIGHT_LABELS[r['weights']]} | {r['params'] / 1e6:.0f} M | "
                f"{r['load_s']:.2f} | {' / '.join(f'{s:.2f}' for s in r['run_s'])} | {fmt(r['rtf'], 3)} | "
                f"{fmt(r['peak']['torch_allocated_mb'])} | {fmt(r['peak']['torch_reserved_mb'])} | "
                f"{fmt(r['measured_mb'])} | {fmt(r['estimate_mb'])} | {fmt(r['ratio'], 2)} | {r['verdict']} | {output} |")
        lines += ["", "Memory in MiB. run s: each transcription (real weights: first, then warm) or the worst-case "
                  "decode (dims-only). RTF = fastest run ÷ audio length. fp16 rows ran in the same process after "
                  "the fp32 one (context and cuBLAS workspace already there).", ""]
    if report["concurrent"]:
        lines += ["| K × model | wall s | run s each | NVML device peak − baseline | Σ process peaks | Σ estimates "
                  "| measured/estimate | verdict |", "|---|---|---|---|---|---|---|---|"]
        for r in report["concurrent"]:
            verdict_text = r["verdict"] + (f"; errors: {'; '.join(e[:80] for e in r['errors'])}" if r["errors"] else "")
            lines.append(f"| {r['count']} × {r['model']} ({r['label']}) | {r['wall_s']:.1f} | "
                         f"{', '.join(f'{s:.2f}' for s in r['run_s'])} | {fmt(r['device_peak_minus_baseline_mb'])} | "
                         f"{fmt(r['sum_process_peaks_mb'])} | {fmt(r['estimate_sum_mb'])} | {fmt(r['ratio'], 2)} | "
                         f"{verdict_text} |")
        lines.append("")
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


class Report:
    """Written after every run, so that a run cut short still leaves its figures behind."""

    def __init__(self, out: Path, environment: dict, estimates: dict):
        self.out = out
        self.data = {"environment": environment, "estimates": estimates, "single": [], "concurrent": [], "notes": []}

    def write(self) -> str:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.data, indent=1, default=str))
        markdown = render_markdown(self.data)
        (self.out / "gpu_check.md").write_text(markdown)
        return markdown


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio", required=True, help="16-bit PCM wav of real speech (16 kHz mono preferred)")
    parser.add_argument("--reference", default="", help="the words spoken, for a WER of real-weight runs")
    parser.add_argument("--reference-file", help="file holding the words spoken")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="real weights for a catalog model (plain or packed); repeatable")
    parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES),
                        help="dims-only sizes to measure, for those without a checkpoint ('' for none)")
    parser.add_argument("--concurrent", action="append", metavar="MODEL:K",
                        help=f"K processes of MODEL at once; repeatable (default {' '.join(DEFAULT_CONCURRENT)})")
    parser.add_argument("--estimates", help="JSON from bench/catalog_estimates.py (default: the seed's figures)")
    parser.add_argument("--weights", default="fp32",
                        help="parameter dtypes to measure, comma-separated: fp32 (as WhisperHub loads), fp16")
    parser.add_argument("--sample-len", type=int, default=224, help="token cap of a dims-only decode")
    parser.add_argument("--budget-s", type=float, default=300, help="start no new run after this many seconds")
    parser.add_argument("--run-timeout-s", type=float, default=150, help="kill a run after this many seconds")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke run of every code path on the CPU (no GPU figures)")
    parser.add_argument("--out", required=True, help="folder for results.json and gpu_check.md")
    return parser.parse_args(argv)


def environment(probe) -> dict:
    import whisper

    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "whisper": whisper.__version__,
           "host": platform.node(), "cpu_count": os.cpu_count()}
    if isinstance(probe, Nvml):
        env["gpu"] = probe.describe()
    return env


def prepare_checkpoints(pairs: list[str], tmp: Path) -> dict[str, dict]:
    """{name: {"path", "packed"}}; packed files are unpacked once, here, for the loader."""
    pack = load_module("bench/pack_checkpoint.py", "pack_checkpoint")
    checkpoints = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        if not path or not Path(path).is_file():
            sys.exit(f"--checkpoint {pair!r}: expected NAME=PATH of an existing file")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        packed = pack.is_packed(checkpoint)
        if packed:
            path = tmp / f"{name}.pt"
            torch.save(pack.unpack(checkpoint), path)
        del checkpoint
        checkpoints[name] = {"path": str(path), "packed": packed}
    return checkpoints


def model_spec(name: str, checkpoints: dict, args, audio: str, reference: str, weights: list[str]) -> dict:
    base = {"device": "cuda:0" if args.device == "cuda" else "cpu", "nvml_index": nvml_index(), "audio": audio,
            "weights": weights, "sample_len": args.sample_len, "reference": reference}
    if name in checkpoints:
        label = "real weights, int8-packed for transfer" if checkpoints[name]["packed"] else "real weights"
        return dict(base, kind="checkpoint", path=checkpoints[name]["path"], label=label, repeats=2)
    if name not in OFFICIAL_DIMS:
        sys.exit(f"{name!r}: no checkpoint given and no official dims known ({', '.join(OFFICIAL_DIMS)})")
    return dict(base, kind="dims", dims=OFFICIAL_DIMS[name], label="dims-only (memory only)", repeats=1)


def nvml_index() -> int:
    """NVML numbers GPUs physically; cuda:0 is the first of CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(visible) if visible.isdigit() else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    # Ask NVML, not the CUDA runtime, whether a GPU exists: this process must stay CUDA-free
    # so that its NVML readings contain only the spawned runs.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    estimates = json.loads(Path(args.estimates).read_text()) if args.estimates else ledger_estimates()
    out = Path(args.out)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_GPU, flush=True)
        report = Report(out, environment(NoNvml()), estimates)
        report.data["message"] = NO_GPU
        report.write()
        return 0

    probe = open_nvml(nvml_index()) if args.device == "cuda" else NoNvml()
    report = Report(out, environment(probe), estimates)
    if args.device == "cpu":
        report.data["message"] = "CPU smoke run: checks the code paths; no GPU figures."
    reference = Path(args.reference_file).read_text().strip() if args.reference_file else args.reference
    audio_s = len(read_wav(args.audio)) / SAMPLE_RATE
    weights = [w for w in args.weights.split(",") if w]
    started = time.perf_counter()

    def time_left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = prepare_checkpoints(args.checkpoint, Path(tmp))
        names = list(checkpoints) + [s for s in args.sizes.split(",") if s and s not in checkpoints]
        for name in names:
            if time_left() <= 0:
                report.data["notes"].append(f"{name}: skipped, time budget of {args.budget_s:.0f} s spent")
                continue
            spec = model_spec(name, checkpoints, args, args.audio, reference, weights)
            print(f"[{time.perf_counter() - started:6.1f} s] {name}: {spec['label']}", flush=True)
            outcome = run_processes(spec, 1, min(args.run_timeout_s, time_left() + 45), probe)
            report.data["single"] += single_rows(name, spec, outcome, estimate_mb(estimates, name), audio_s)
            report.write()
        for item in args.concurrent or DEFAULT_CONCURRENT:
            name, _, count = item.partition(":")
            if time_left() <= 0:
                report.data["notes"].append(f"{item}: skipped, time budget of {args.budget_s:.0f} s spent")
                continue
            spec = model_spec(name, checkpoints, args, args.audio, reference, weights[:1])
            spec["repeats"] = 1
            print(f"[{time.perf_counter() - started:6.1f} s] {count} × {name} at once: {spec['label']}", flush=True)
            outcome = run_processes(spec, int(count or 1), min(args.run_timeout_s, time_left() + 45), probe)
            report.data["concurrent"].append(concurrent_row(name, int(count or 1), spec, outcome, estimate_mb(estimates, name)))
            report.write()
    report.data["total_s"] = time.perf_counter() - started
    print(report.write(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
