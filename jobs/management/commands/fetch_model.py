"""Download an official openai-whisper checkpoint, verify it and register it.

    manage.py fetch_model NAME [--force] [--memory-mb N]

The URL and its SHA-256 come from openai-whisper itself (whisper._MODELS: the digest is the
URL's second-to-last path segment). Needs the internet; an air-gapped site converts
packaged weights with `import_model` instead.
"""

import base64
import gzip
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from django.conf import settings
from django.core.management import BaseCommand, CommandError

from jobs.management.commands.import_model import model_register
from jobs.models import WhisperModel

CHUNK = 1 << 20
TIMEOUT_S = 30


class Command(BaseCommand):
    help = "Download an official Whisper checkpoint (needs the internet), check its SHA-256 and register it."

    def add_arguments(self, parser):
        parser.add_argument("name", help="Official model name, e.g. tiny.en, base, small, large-v3, turbo.")
        parser.add_argument("--force", action="store_true", help="Replace an existing checkpoint.")
        parser.add_argument("--memory-mb", type=int, help="Memory need in MiB (default: the catalog's).")

    def handle(self, *args, name, force, memory_mb, **options):
        import whisper

        if name not in whisper._MODELS:
            raise CommandError(f"no official model {name!r}; known: {', '.join(whisper._MODELS)}")
        if memory_mb is not None and memory_mb <= 0:
            raise CommandError("--memory-mb must be positive")
        if memory_mb is None and not WhisperModel.objects.filter(name=name).exists():
            raise CommandError(f"{name!r} is not in the catalog: give its memory need with --memory-mb")
        dest = Path(settings.WHISPERHUB_MODEL_DIR) / f"{name}.pt"
        if dest.exists() and not force:
            raise CommandError(f"{dest} already exists; use --force to replace it")

        url = whisper._MODELS[name]
        expected = url.split("/")[-2]
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".download")
        try:
            with os.fdopen(fd, "wb") as out:
                digest = self.download(name, url, out)
            if digest != expected:
                raise CommandError(f"SHA-256 mismatch for {name}: got {digest}, expected {expected}; the download was discarded")
            summary = add_alignment_heads(name, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        model_register(
            name=name, checkpoint=dest, sha256=summary["sha256"], size=dest.stat().st_size,
            english_only=summary["english_only"], memory_mb=memory_mb,
        )
        self.stdout.write(self.style.SUCCESS(f"Fetched {name} → {dest} (download SHA-256 verified)"))

    def download(self, name: str, url: str, out) -> str:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                while chunk := response.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CommandError(f"cannot download {name} from {url}: {reason} (no internet? use `manage.py import_model`)") from None
        return digest.hexdigest()


def add_alignment_heads(name: str, path: str) -> dict:
    """Store openai-whisper's alignment heads in the checkpoint, as import_model does.

    whisper.load_model(name) sets them by name; our loader goes by path and reads them
    from the file, so a fetched file without them would align words with the default heads.
    """
    import numpy as np
    import torch
    import whisper

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    dims = checkpoint["dims"]
    mask = np.frombuffer(gzip.decompress(base64.b85decode(whisper._ALIGNMENT_HEADS[name])), dtype=bool)
    heads = np.argwhere(mask.reshape(dims["n_text_layer"], dims["n_text_head"]))
    checkpoint["alignment_heads"] = heads.tolist()
    with open(path, "w+b") as fh:
        torch.save(checkpoint, fh)
        fh.flush()
        os.fsync(fh.fileno())
        fh.seek(0)
        sha256 = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"sha256": sha256, "english_only": dims["n_vocab"] < 51865}
