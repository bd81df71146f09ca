"""Loaded before Django settings: isolate this test run from a running `make run`."""

import os

# Each concurrent test run names its own test database (WHISPERHUB_TEST_DB) and channel
# prefix, so a developer's run beside CI's (or beside `make run`) never shares rows or events.
os.environ.setdefault("WHISPERHUB_TEST_DB", "test_whisperhub")
os.environ.setdefault("WHISPERHUB_CHANNEL_PREFIX", "t-" + os.environ["WHISPERHUB_TEST_DB"])
