"""Result files (txt, srt, vtt, tsv, json), written by openai-whisper's own writers.

The writers only write to a directory, named after an audio path; we give them a temporary
directory and a fixed base name, and read the bytes back. The user's file name never reaches
the filesystem: it is used only for the download's Content-Disposition.
"""

import re
import tempfile
import unicodedata
from pathlib import Path

from whisper.utils import get_writer

FORMATS = ("txt", "srt", "vtt", "tsv", "json")
CONTENT_TYPES = {
    "txt": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "tsv": "text/tab-separated-values; charset=utf-8",
    "json": "application/json",
}
# What `whisper` CLI passes when no line shaping is asked for; the subtitle writers expect the keys.
WRITER_OPTIONS = {"max_line_width": None, "max_line_count": None, "highlight_words": False}


def result_render(*, result: dict, fmt: str) -> bytes:
    """One result in one format, as the whisper CLI would have written it."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    with tempfile.TemporaryDirectory(prefix="whisperhub-out-") as folder:
        get_writer(fmt, folder)(result, "result.wav", WRITER_OPTIONS)
        return (Path(folder) / f"result.{fmt}").read_bytes()


def download_filename(original_name: str, fmt: str) -> str:
    """A safe ASCII file name for a download: the uploaded name's stem, new extension.

    Separators, control characters and quotes cannot survive, so the header cannot be
    split or point anywhere; a name with nothing left becomes "transcript".
    """
    stem = Path(original_name.replace("\\", "/")).name
    stem = stem.rsplit(".", 1)[0] if "." in stem.lstrip(".") else stem
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    safe = re.sub(r"[^A-Za-z0-9._ -]+", "_", ascii_stem).strip(" ._-")[:100]
    return f"{safe or 'transcript'}.{fmt}"
