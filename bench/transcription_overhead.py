"""Benchmark 4: what a WhisperHub job costs on top of a bare model.transcribe call.

The same speech (espeak-ng, about 6 s) through a WhisperHub job — job_create, dispatch, a
real qcluster worker whose tiny.en is preloaded, the executor with its progress writes and
result storage, completion — and through a bare call in this process: the executor's own
decode (ffmpeg) and `model.transcribe` with the same options (beam 5, temperature 0, fp32 on
the CPU). Runs alternate, after one warm-up each, so that the machine's noise hits both.
Reported, against the goal "at most 5% above bare Whisper plus under 0.5 s per job": the
fixed cost per job (job wall − the executor's own transcription time, from submission to
completion) and the transcription's ratio to the bare call; also the plain wall-time ratio.
"""

import argparse
import statistics
import wave
from pathlib import Path
from tempfile import TemporaryDirectory

import common
from django.conf import settings

TEXT = "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden porch."


def run(repeats: int, folder: Path, budget) -> dict:
    from jobs.whisper_convert import load_whisper_checkpoint

    user = common.make_user()
    common.cpu_node_device()
    common.install_tiny(preload=True)  # "once the model is loaded": the worker keeps it
    settings.WHISPERHUB_WORKERS = 1
    clip = common.speak(TEXT, folder, "speech")
    model = load_whisper_checkpoint(common.tiny_checkpoint(), "cpu").eval()

    bare, jobs = [], []
    with common.qcluster(1, folder / "qcluster.log"):
        for i in range(repeats + 1):  # the first of each is a warm-up
            if len(bare) >= 2 and budget.spent():
                break
            seconds, text = common.bare_transcribe(model, clip)
            job, start, commit = common.submit(user, clip, language="en")
            (job,) = common.wait_final([job.id], timeout_s=300)
            if i == 0:
                continue
            bare.append(seconds)
            jobs.append({"wall_s": job.finished_at.timestamp() - start, "submit_s": commit - start,
                         "commit_to_load_start_s": common.load_started_at(job) - commit,
                         "load_s": job.load_seconds, "transcribe_s": job.transcribe_seconds,
                         "state": job.state, "text": job.files.first().text, "bare_text": text})
    with wave.open(str(clip)) as w:
        audio_s = w.getnframes() / w.getframerate()
    return dict(_summary(bare, jobs), audio_s=audio_s)


def _summary(bare: list[float], jobs: list[dict]) -> dict:
    """Split the job into what surrounds the transcription and the transcription itself.

    wall − executor transcription is measured inside one job, so this shared machine's bursts
    of load hardly touch it; the transcription against the bare call is compared on the least
    disturbed run of each (the minimum), the usual estimate of a cost under noise.
    """
    outside = [j["wall_s"] - j["transcribe_s"] for j in jobs]
    return {
        "repeats": len(jobs),
        "bare_s": bare,
        "jobs": jobs,
        "min_bare_s": min(bare),
        "min_executor_transcribe_s": min(j["transcribe_s"] for j in jobs),
        "min_job_s": min(j["wall_s"] for j in jobs),
        "median_bare_s": statistics.median(bare),
        "median_job_s": statistics.median(j["wall_s"] for j in jobs),
        "transcription_ratio": min(j["transcribe_s"] for j in jobs) / min(bare),
        "fixed_cost_s": statistics.median(outside),
        "fixed_cost_range_s": [min(outside), max(outside)],
        "ratio": min(j["wall_s"] for j in jobs) / min(bare),
        "spread_bare_s": [min(bare), max(bare)],
        "median_submit_s": statistics.median(j["submit_s"] for j in jobs),
        "median_commit_to_load_start_s": statistics.median(j["commit_to_load_start_s"] for j in jobs),
        "all_completed": all(j["state"] == "completed" for j in jobs),
        "goal": {"transcription_ratio_max": 1.05, "fixed_cost_max_s": 0.5},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--budget-s", type=float, help="start no new pair after this long (at least two run)")
    args = parser.parse_args()
    with common.bench_database(), TemporaryDirectory() as tmp:
        common.write_result("transcription_overhead", run(args.repeats, Path(tmp), common.Budget(args.budget_s)))


if __name__ == "__main__":
    main()
