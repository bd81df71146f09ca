"""Work for a separate process hammering the ledger (tests/test_ledger.py starts it with spawn).

Kept apart from the test module: a spawned child imports this before Django is set up, so it
must not import models at the top.
"""

import os
import random
import time


def hammer(test_db_name: str, device_ids: list[int], iterations: int, seed: int, start) -> dict:
    """Reserve and release at random against the test database; return what happened."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "whisperhub.settings")
    import django

    django.setup()
    from django.db import connection

    # The child read the settings afresh; point it at the test database the parent created.
    connection.settings_dict["NAME"] = test_db_name

    from gpus import services

    rng = random.Random(seed)
    granted, released, refused, held = [], [], 0, []
    start.wait()
    began = time.time()
    try:
        for _ in range(iterations):
            preference = rng.sample(device_ids, len(device_ids))
            allocation = services.allocation_reserve_first_fit(device_ids=preference, mb=rng.choice([100, 200, 300, 500]))
            if allocation is None:
                refused += 1
            else:
                granted.append(allocation.id)
                held.append(allocation.id)
            if held and (len(held) > 2 or rng.random() < 0.5):
                allocation_id = held.pop(rng.randrange(len(held)))
                if services.allocation_release(allocation_id=allocation_id, reason="done"):
                    released.append(allocation_id)
                # A second release of the same row must change nothing.
                assert not services.allocation_release(allocation_id=allocation_id, reason="twice")
    finally:
        ended = time.time()
        connection.close()
    return {"granted": granted, "released": released, "refused": refused, "pid": os.getpid(), "window": (began, ended)}
