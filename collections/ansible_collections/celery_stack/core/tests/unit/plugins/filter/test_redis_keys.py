"""Unit tests of the Redis broker's keys (plugins/filter/redis_keys.py), run by `make test`."""

import sys
from pathlib import Path

# collections/ on the import path, as Ansible's collection loader would put it.
sys.path.insert(0, str(Path(__file__).resolve().parents[7]))

from ansible_collections.celery_stack.core.plugins.filter import redis_keys  # noqa: E402


def test_redis_broker_keys():
    assert redis_keys.redis_broker_keys(["io", "celery"]) == ["io", "io??[369]", "celery", "celery??[369]"]
