"""import_model and fetch_model: packaged weights become catalog checkpoints, offline first."""

import hashlib
import http.server
import threading
from functools import partial

import pytest
import whisper
from django.core.management import CommandError, call_command

from jobs.models import WhisperModel


@pytest.fixture
def model_dir(settings, tmp_path):
    settings.WHISPERHUB_MODEL_DIR = tmp_path / "models"
    return settings.WHISPERHUB_MODEL_DIR


def sha256(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def test_import_from_package_registers_a_loadable_checkpoint(db, model_dir):
    WhisperModel.objects.filter(name="tiny.en").update(memory_mb=777)  # an admin's tuning survives

    call_command("import_model", "--from-package", "tiny.en")

    row = WhisperModel.objects.get(name="tiny.en")
    assert row.installed and row.checkpoint == "tiny.en.pt"
    assert row.sha256 == sha256(model_dir / "tiny.en.pt") and row.size_bytes == (model_dir / "tiny.en.pt").stat().st_size
    assert row.english_only and row.memory_mb == 777
    from jobs.whisper_convert import load_whisper_checkpoint

    assert not load_whisper_checkpoint(row.checkpoint_path).is_multilingual


def test_import_folder_under_a_new_name_needs_memory_and_force_to_replace(db, model_dir):
    from jobs.whisper_convert import ct2_package_dirs

    folder = str(ct2_package_dirs()["tiny.en"])
    with pytest.raises(CommandError, match="--memory-mb"):
        call_command("import_model", folder, "--name", "my-tiny")
    assert not (model_dir / "my-tiny.pt").exists()

    call_command("import_model", folder, "--name", "my-tiny", "--memory-mb", "900")
    assert WhisperModel.objects.get(name="my-tiny").memory_mb == 900

    with pytest.raises(CommandError, match="--force"):
        call_command("import_model", folder, "--name", "my-tiny")
    call_command("import_model", folder, "--name", "my-tiny", "--force", "--memory-mb", "950")
    assert WhisperModel.objects.get(name="my-tiny").memory_mb == 950


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/folder", "--name", "x"], "does not exist"),
        (["--from-package", "large-v9"], "no packaged"),
        (["--name", "tiny.en"], "SOURCE"),
        (["--from-package", "tiny.en", "--name", "../evil"], "invalid model name"),
    ],
)
def test_bad_arguments_are_one_line_errors(db, model_dir, args, message):
    with pytest.raises(CommandError, match=message):
        call_command("import_model", *args)


def test_not_a_ctranslate2_folder_is_refused(db, model_dir, tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.bin").write_bytes(b"\x01\x00\x00\x00not a model")
    with pytest.raises(CommandError, match="cannot convert"):
        call_command("import_model", str(tmp_path / "junk"), "--name", "tiny.en")
    assert not (model_dir / "tiny.en.pt").exists()


def test_if_none_installed_imports_once(db, model_dir):
    WhisperModel.objects.update(checkpoint="")

    call_command("import_model", "--if-none-installed")
    first = WhisperModel.objects.get(name="tiny.en")
    assert first.installed
    mtime = first.checkpoint_path.stat().st_mtime_ns

    call_command("import_model", "--if-none-installed")  # something is installed: nothing to do
    assert first.checkpoint_path.stat().st_mtime_ns == mtime


@pytest.fixture
def mirror(tmp_path):
    """A local HTTP server standing in for OpenAI's download site."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_fetch_checks_the_sha256_from_the_url_and_registers(db, model_dir, mirror, tiny_checkpoint, monkeypatch):
    root, base = mirror
    digest = tiny_checkpoint["sha256"]
    (root / digest).mkdir()
    (root / digest / "tiny.en.pt").write_bytes(tiny_checkpoint["path"].read_bytes())
    monkeypatch.setitem(whisper._MODELS, "tiny.en", f"{base}/{digest}/tiny.en.pt")

    call_command("fetch_model", "tiny.en")

    row = WhisperModel.objects.get(name="tiny.en")
    assert row.installed and row.english_only
    from jobs.whisper_convert import load_whisper_checkpoint

    load_whisper_checkpoint(row.checkpoint_path)


def test_fetch_refuses_a_download_with_the_wrong_sha256(db, model_dir, mirror, monkeypatch):
    root, base = mirror
    wrong = "0" * 64
    (root / wrong).mkdir()
    (root / wrong / "tiny.en.pt").write_bytes(b"tampered")
    monkeypatch.setitem(whisper._MODELS, "tiny.en", f"{base}/{wrong}/tiny.en.pt")

    with pytest.raises(CommandError, match="SHA-256"):
        call_command("fetch_model", "tiny.en")
    assert not WhisperModel.objects.get(name="tiny.en").installed
    assert list(model_dir.glob("*")) == []  # no partial download left behind


def test_fetch_without_network_is_a_clear_error(db, model_dir, monkeypatch):
    monkeypatch.setitem(whisper._MODELS, "tiny.en", f"http://127.0.0.1:9/{'a' * 64}/tiny.en.pt")
    with pytest.raises(CommandError, match="cannot download tiny.en"):
        call_command("fetch_model", "tiny.en")


def test_fetch_unknown_name(db, model_dir):
    with pytest.raises(CommandError, match="no official"):
        call_command("fetch_model", "tiny-v42")
