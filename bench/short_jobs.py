"""Benchmark 5: 20 short jobs on one model, WhisperHub's cached model against loading it per job.

Twenty different sentences of a few seconds each (espeak-ng), one job after another, after
one warm-up job each (not counted).
WhisperHub: each job goes through job_create and one qcluster worker with tiny.en preloaded
runs it (wall: call → job finished). Seed baseline: what the seed's executor does per task,
in this process — load the model (load_model_stage; here load_whisper_checkpoint, since
models load by path), decode the audio, transcribe. The two alternate job by job, so that
this shared machine's bursts of load fall on both. Reported: total wall time of each, ratio.
"""

import argparse
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import common
from django.conf import settings

SENTENCES = [
    "Please send the report before noon.", "The train leaves at half past seven.",
    "We moved the meeting to Thursday.", "Turn left at the second light.",
    "The soup needs a little more salt.", "My sister plays the violin.",
    "The library opens at nine tomorrow.", "Bring an umbrella, it might rain.",
    "The printer on the third floor is broken.", "He painted the fence bright green.",
    "Our flight was delayed by an hour.", "The children built a castle of sand.",
    "Call me when you reach the station.", "The garden is full of yellow roses.",
    "She forgot her keys at the office.", "The river rose after the storm.",
    "We need two more chairs for dinner.", "The museum closes early on Sundays.",
    "He fixed the bicycle in ten minutes.", "The coffee machine makes a strange noise.",
]


def whisperhub_job(user, clip: Path) -> dict:
    job, start, _commit = common.submit(user, clip, language="en")
    (job,) = common.wait_final([job.id], timeout_s=300)
    return {"wall_s": job.finished_at.timestamp() - start, "transcribe_s": job.transcribe_seconds,
            "load_s": job.load_seconds, "state": job.state}


def seed_job(checkpoint: Path, clip: Path) -> dict:
    from jobs.whisper_convert import load_whisper_checkpoint

    started = time.perf_counter()
    model = load_whisper_checkpoint(checkpoint, "cpu").eval()
    load_s = time.perf_counter() - started
    common.bare_transcribe(model, clip)
    return {"wall_s": time.perf_counter() - started, "load_s": load_s}


def _fastest_quarter(jobs: list[dict]) -> float:
    walls = sorted(j["wall_s"] for j in jobs)
    quarter = walls[: max(1, len(walls) // 4)]
    return sum(quarter) / len(quarter)


def run(user, clips: list[Path], folder: Path, budget) -> dict:
    checkpoint = common.tiny_checkpoint()
    ours, seed = [], []
    warm_up = common.speak("This first job only warms both sides up.", folder, "warm-up")
    with common.qcluster(1, folder / "qcluster.log"):
        # Not counted: the first transcription of a process builds the tokenizer and mel filters.
        first = {"whisperhub_s": whisperhub_job(user, warm_up)["wall_s"], "seed_s": seed_job(checkpoint, warm_up)["wall_s"]}
        for clip in clips:
            if budget.spent():
                break
            ours.append(whisperhub_job(user, clip))
            seed.append(seed_job(checkpoint, clip))
    total_ours, total_seed = sum(j["wall_s"] for j in ours), sum(j["wall_s"] for j in seed)
    return {
        "jobs": len(ours),
        "jobs_planned": len(clips),
        "whisperhub": {"wall_s": total_ours, "sum_load_s": sum(j["load_s"] or 0 for j in ours),
                       "sum_transcribe_s": sum(j["transcribe_s"] or 0 for j in ours),
                       "states": sorted({j["state"] for j in ours})},
        "seed_load_per_job": {"wall_s": total_seed, "sum_load_s": sum(j["load_s"] for j in seed)},
        "ratio_seed_over_whisperhub": total_seed / total_ours,
        "median_pair_ratio": statistics.median(s["wall_s"] / o["wall_s"] for s, o in zip(seed, ours)),
        # This shared machine's bursts of load multiply single jobs' times several-fold; the
        # fastest quarter of each side is the least disturbed estimate of the per-job cost.
        "fastest_quarter_ratio": _fastest_quarter(seed) / _fastest_quarter(ours),
        "per_job": {"whisperhub_s": [j["wall_s"] for j in ours], "seed_s": [j["wall_s"] for j in seed]},
        "warm_up_job": first,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=len(SENTENCES))
    parser.add_argument("--budget-s", type=float, help="start no new pair after this long")
    args = parser.parse_args()
    with common.bench_database(), TemporaryDirectory() as tmp:
        folder = Path(tmp)
        user = common.make_user()
        common.cpu_node_device()
        common.install_tiny(preload=True)
        settings.WHISPERHUB_WORKERS = 1
        clips = [common.speak(text, folder, f"s{i}") for i, text in enumerate(SENTENCES[: args.jobs])]
        common.write_result("short_jobs", run(user, clips, folder, common.Budget(args.budget_s)))


if __name__ == "__main__":
    main()
