"""openai-whisper steps the executor needs, free of Django so they run (and are checked) anywhere.

jobs/executor.py calls these inside a q2 worker; bench/executor_gpu_check.py calls the same
functions on a GPU machine that has no database.
"""

import importlib
import json
from contextlib import contextmanager


class Undecodable(Exception):
    """ffmpeg cannot read the file: that file fails with this message, the job goes on."""


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


@contextmanager
def whisper_hooks(model, *, on_progress, on_step):
    """Call on_progress(fraction) as whisper's transcribe loop advances, on_step() before each decoder pass.

    openai-whisper has no progress callback, only a tqdm bar over the audio frames (one update
    per 30 s window). We swap the `tqdm` name inside whisper.transcribe's module for a namespace
    whose bar reports to on_progress; other tqdm users in the process are untouched. The
    decoder pre-hook runs once per generated token, so an exception raised by on_step (Fenced,
    TimedOut) leaves transcribe() within one token, not one window.
    """
    import tqdm

    module = importlib.import_module("whisper.transcribe")  # `whisper.transcribe` is the function

    class Bar(tqdm.tqdm):
        def update(self, n=1):
            super().update(n)
            self.done = getattr(self, "done", 0) + n
            if self.total:
                on_progress(min(1.0, self.done / self.total))

    original = module.tqdm
    module.tqdm = type("tqdm_namespace", (), {"tqdm": Bar})
    handle = model.decoder.register_forward_pre_hook(lambda module, args: on_step())
    try:
        yield
    finally:
        handle.remove()
        module.tqdm = original


def decode_audio(path: str):
    """Decode through ffmpeg as whisper does; a file ffmpeg can't read raises Undecodable."""
    from whisper.audio import load_audio

    try:
        samples = load_audio(path)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()
        reason = detail[-1] if detail else "ffmpeg could not decode it"
        raise Undecodable(f"Could not decode the audio file: {reason}") from None
    except FileNotFoundError:
        raise Undecodable("Could not decode the audio file: it is missing from storage") from None
    if samples.size == 0:
        raise Undecodable("Could not decode the audio file: it contains no audio")
    return samples


def result_for_storage(result: dict, samples) -> dict:
    """Whisper's result as plain JSON: text, language, duration and segments without token ids."""
    from whisper.audio import SAMPLE_RATE

    segments = [{k: v for k, v in segment.items() if k != "tokens"} for segment in result["segments"]]
    stored = {
        "text": result["text"].strip(),
        "language": result.get("language", ""),
        "duration": round(len(samples) / SAMPLE_RATE, 3),
        "segments": segments,
    }
    # numpy scalars (word probabilities) are not JSON: round-trip through floats.
    return json.loads(json.dumps(stored, default=float))
