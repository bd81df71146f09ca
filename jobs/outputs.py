"""Result files (txt, srt, vtt, tsv, json), written by openai-whisper's own writers.

The writers only write to a directory, named after an audio path; we give them a temporary
directory and a fixed base name, and read the bytes back. The user's file name never reaches
the filesystem: it is used only for the download's Content-Disposition.
"""

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
# Characters that mean something in a header or to a file system; never part of a download's name.
UNSAFE = set('"\'\\/:*?<>|;%')
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
    """A download's file name: the uploaded name's stem with the format's extension.

    Separators, control characters and quotes are replaced, so the name can neither split the
    header nor point into a folder; other Unicode is kept (Content-Disposition carries it as
    RFC 5987 filename*). A name with nothing left becomes "transcript".
    """
    name = unicodedata.normalize("NFC", original_name.replace("\\", "/")).rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    safe = "".join("_" if c in UNSAFE or (unicodedata.category(c)[0] in "CZ" and c != " ") else c for c in stem)
    safe = safe.strip(" ._")[:100]
    return f"{safe or 'transcript'}.{fmt}"
