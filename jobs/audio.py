"""What an uploaded file really is, asked of ffprobe (the program openai-whisper's ffmpeg comes with).

The name and the browser's content type prove nothing; a job is accepted only when ffprobe
finds an audio stream with a positive duration, so a text file renamed .wav is refused at
submission instead of failing later in a worker.
"""

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

PROBE_TIMEOUT_S = 30
# Decoding a whole file to learn its length is the slow fallback; it gets more time.
DECODE_TIMEOUT_S = 300


class AudioProbeError(Exception):
    """The file is not audio we can transcribe; the message says why, for the user."""


@dataclass(frozen=True)
class AudioInfo:
    duration_s: float
    codec: str
    format_name: str
    sample_rate: int | None
    channels: int | None


def probe_audio(path: str | Path) -> AudioInfo:
    """Describe the first audio stream of `path`; raises AudioProbeError for anything else."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise AudioProbeError("The file is empty.")
    report = _ffprobe(path)
    stream = next((s for s in report.get("streams", []) if s.get("codec_type") == "audio"), None)
    if stream is None:
        raise AudioProbeError("The file has no audio stream.")
    duration = _float(stream.get("duration")) or _float(report.get("format", {}).get("duration"))
    if duration is None:
        # Streamed containers (a browser's MediaRecorder WebM) carry no duration in any header.
        duration = _decoded_duration(path)
    if not duration or duration <= 0:
        raise AudioProbeError("The audio has no duration (no sound was recorded).")
    return AudioInfo(
        duration_s=duration,
        codec=stream.get("codec_name", ""),
        format_name=report.get("format", {}).get("format_name", ""),
        sample_rate=_int(stream.get("sample_rate")),
        channels=_int(stream.get("channels")),
    )


def _ffprobe(path: Path) -> dict:
    command = ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams", str(path)]
    completed = _run(command, PROBE_TIMEOUT_S)
    if completed.returncode != 0:
        detail = completed.stderr.strip().splitlines()[-1:] or ["unknown format"]
        raise AudioProbeError(f"Not a readable audio file ({_strip_path(detail[0], path)}).")
    try:
        return json.loads(completed.stdout or "{}")
    except json.JSONDecodeError:
        raise AudioProbeError("Not a readable audio file (ffprobe gave no description).") from None


def _decoded_duration(path: Path) -> float | None:
    command = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-vn", "-f", "null", "-progress", "pipe:1", "-"]
    completed = _run(command, DECODE_TIMEOUT_S)
    if completed.returncode != 0:
        raise AudioProbeError("The audio cannot be decoded.")
    times = [line.split("=", 1)[1] for line in completed.stdout.splitlines() if line.startswith("out_time_us=")]
    microseconds = _float(times[-1]) if times else None
    return microseconds / 1e6 if microseconds is not None else None


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise AudioProbeError(f"Reading the file took longer than {timeout:.0f} s.") from None
    except FileNotFoundError:
        # A missing ffmpeg is the installation's fault, not the user's: let it surface as a 500 and a log.
        raise RuntimeError(f"{command[0]} is not installed (Debian package ffmpeg)") from None


def _strip_path(message: str, path: Path) -> str:
    # ffprobe names the stored (random) path; the user knows the file by another name.
    return message.replace(f"{path}: ", "").replace(str(path), "the file")


def _float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN: "N/A" in some builds


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
