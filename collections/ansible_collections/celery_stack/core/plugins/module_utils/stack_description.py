# -*- coding: utf-8 -*-
"""The stack description's shared vocabulary and the decisions several filter files take from it.

Each constant and each decision is stated here once; the filter files of plugins/filter/ import
them (``from ansible_collections.celery_stack.core.plugins.module_utils.stack_description
import ...``):

- ``POOLS``, ``PREFORK_ONLY``, ``WORKER_GROUP``: the worker pools, the options only prefork
  enforces, the inventory group of the worker hosts;
- ``PRODUCER_CONTROL_EXCHANGE``: the producers' own control mailbox (Celery settings and the
  producers' RabbitMQ permissions); ``DEAD_LETTER_SUFFIX``: the dead-letter queues' names;
- ``as_bool``, ``quorum_queues``, ``routing_table``: the queue types, THE typed routing table
  (exposed as filters by plugins/filter/routing.py); ``OVERFLOWS``, ``queue_limits``: a queue's
  length limits;
- ``is_glob``, ``pool_enabled``, ``placement``, ``pool_hosts``: which pools of a queue run,
  and on which hosts (the preflight's rules and the worker instances).
"""

from ansible.errors import AnsibleFilterError

POOLS = ("prefork", "threads")
# Options only the prefork pool enforces (the threads pool ignores them: celery #9203).
PREFORK_ONLY = ("max_tasks_per_child", "max_memory_per_child", "time_limit", "soft_time_limit")
WORKER_GROUP = "celery_workers"

# Revoke from producer hosts (celery_stack_worker.py, section "Revoke from producer hosts"): on
# RabbitMQ the producers' control commands go to a mailbox of their own, <name>.pidbox, where the
# workers accept revoke only, instead of Celery's celery.pidbox with every remote-control command.
PRODUCER_CONTROL_EXCHANGE = "celery-stack-producers"

# Poison tasks (celery_stack_worker.py, section "Poison tasks"): the workers declare a dead-letter
# queue <queue>.dead-letter next to each routed queue (a table's queue may not take that name).
DEAD_LETTER_SUFFIX = ".dead-letter"


def as_bool(setting, unset=False):
    """A boolean as the inventory gives it: a bool, or a templated bool that arrives as a string
    ("True", "yes", "on", "1"); `unset` when None or empty."""
    if setting is None or setting == "":
        return unset
    if isinstance(setting, str):
        return setting.strip().lower() in ("true", "yes", "on", "1")
    return bool(setting)


def quorum_queues(setting, brokers=()):
    """Quorum queues (replicated) when the inventory says so, else when there is more than one broker."""
    return as_bool(setting, len(brokers or []) > 1)


# Length limits of a routed queue (RabbitMQ, by policy: the dead-letter policy of the queue
# carries them, tasks/dead_letters.yml of roles/rabbitmq). What happens to a message over the limit:
OVERFLOWS = ("drop-head", "reject-publish", "reject-publish-dlx")
# The overflow a queue gets when the table sets a limit and no overflow: reject-publish. The
# producer learns it (with publisher confirms, which the stack's settings turn on, the broker
# nacks the publish and .delay() raises) and can back off or retry. drop-head, RabbitMQ's own
# default, would take the OLDEST waiting tasks out of the queue to make room, without telling
# anyone: tasks lost silently (here: moved to <queue>.dead-letter, where nothing runs them).
DEFAULT_OVERFLOW = "reject-publish"
# Quorum queues accept drop-head and reject-publish only (RabbitMQ refuses reject-publish-dlx).
QUORUM_OVERFLOWS = ("drop-head", "reject-publish")


def _limit(value):
    """A length limit as the table gives it: an int, 0/None/"" meaning none."""
    if value is None or value == "":
        return None
    return int(value) or None


def queue_limits(queue):
    """The length limits of one queue of the table: {max_length, max_length_bytes, overflow},
    only those set (an overflow only with a limit, DEFAULT_OVERFLOW when the table names none),
    so a queue without limits keeps exactly the entry it had."""
    limits = {key: _limit(queue.get(key)) for key in ("max_length", "max_length_bytes")}
    limits = {key: value for key, value in limits.items() if value is not None}
    if limits:
        limits["overflow"] = queue.get("overflow") or DEFAULT_OVERFLOW
    return limits


def routing_table(queues, broker="rabbitmq", quorum=None, brokers=()):
    """Per queue: name, task patterns, the RabbitMQ queue type (None on a Redis broker: the
    queue's own queue_type, else quorum_queues(quorum, brokers)) and max_priority (None: no
    priorities), and on RabbitMQ the length limits where the table sets them (queue_limits). The
    workers' config and the broker's queue check and policies all come from here, so they
    cannot disagree."""
    default_type = "quorum" if quorum_queues(quorum, brokers) else "classic"
    return [dict({"name": queue["name"], "tasks": list(queue.get("tasks") or []),
                  "queue_type": (queue.get("queue_type") or default_type) if broker == "rabbitmq" else None,
                  "max_priority": int(queue.get("max_priority") or 0) or None},
                 **(queue_limits(queue) if broker == "rabbitmq" else {}))
            for queue in queues]


def is_glob(pattern):
    """Celery's MapRoute: a name with "*" is a glob (fnmatch), any other name an exact match."""
    return "*" in pattern


def pool_enabled(pool_settings):
    """A pool runs unless its settings say enabled: false (a templated "False" too)."""
    return as_bool((pool_settings or {}).get("enabled", True))


def placement(names, groups, where):
    """Inventory host and group names -> the hosts they stand for; unknown names raise."""
    hosts = []
    for name in names:
        if name in groups:
            members = groups[name]
        elif any(name in members for members in groups.values()):
            members = [name]
        else:
            raise AnsibleFilterError(f"{where}: {name!r} is neither a host nor a group of the inventory")
        hosts.extend(h for h in members if h not in hosts)
    return hosts


def pool_hosts(queue, pool, groups, index):
    """The worker hosts that run this queue's pool: the pool's `hosts`, else the queue's, else
    every host of the group celery_workers."""
    settings = (queue.get("pools") or {}).get(pool) or {}
    if "hosts" in settings:
        return placement(settings["hosts"], groups, f"celery_stack_queues[{index}].pools.{pool}.hosts")
    if "hosts" in queue:
        return placement(queue["hosts"], groups, f"celery_stack_queues[{index}].hosts")
    return list(groups.get(WORKER_GROUP, []))
