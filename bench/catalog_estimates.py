"""Write the ledger's per-model estimates, as the migrations leave the catalog, for gpu_check.py.

bench/gpu_check.py runs where Django and a database are missing, so it can only read the seed's
figures from jobs/migrations/0002 by itself; later migrations (e.g. 0004, base raised after an
H100 measurement) are missed. This runs every migration on a fresh benchmark database and writes
{"multiplier", "need_mb": {model: MiB}, "source"} to the given file:

    .venv/bin/python bench/catalog_estimates.py .gpu/estimates.json
    python3 bench/gpu_check.py --estimates .gpu/estimates.json ...
"""

import json
import sys
from pathlib import Path

import common

if len(sys.argv) != 2:
    sys.exit(__doc__)
with common.bench_database():
    from jobs.models import SchedulerSettings, WhisperModel

    estimates = {
        "multiplier": SchedulerSettings.load().inference_multiplier,
        "need_mb": dict(WhisperModel.objects.values_list("name", "memory_mb")),
        "source": "the catalog after every migration (bench/catalog_estimates.py)",
    }
out = Path(sys.argv[1])
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(estimates, indent=1))
print(f"{out}: multiplier {estimates['multiplier']}, " + ", ".join(f"{k} {v}" for k, v in estimates["need_mb"].items()))
