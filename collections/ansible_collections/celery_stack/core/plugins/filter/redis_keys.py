# -*- coding: utf-8 -*-
"""Redis as the broker: the keys kombu's Redis transport uses (the broker ACL user's key patterns).

Unit tests: tests/unit/plugins/filter/test_redis_keys.py.
"""


def redis_broker_keys(queue_names):
    """Keys of kombu's Redis transport for these queues (and Celery's default queue "celery"), each
    with its priority variants QUEUE\\x06\\x16{3,6,9} (glob QUEUE??[369])."""
    names = list(dict.fromkeys(list(queue_names) + ["celery"]))
    return [f"{name}{suffix}" for name in names for suffix in ("", "??[369]")]


class FilterModule:
    def filters(self):
        return {f.__name__: f for f in (redis_broker_keys,)}
