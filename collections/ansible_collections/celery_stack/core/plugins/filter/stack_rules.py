# -*- coding: utf-8 -*-
"""Rules across fields of the stack description, as messages naming the inventory variable.

What the argument spec of roles/celery_stack cannot express; run by the preflight
(roles/celery_stack/tasks/main.yml, roles/celery_worker/tasks/validate.yml). The preflight's
other rules (each role's own settings, the table's shape and route patterns) are in
preflight.py.

- ``problems``: the routing table against the inventory, one rule family per function (queue
  names, pool options, placement, route patterns, priorities, default queue, application
  source), concatenated;
- ``priority_problems``: a max_priority the queue cannot carry;
- ``length_problems``: a length limit (max_length, max_length_bytes, overflow) the queue cannot
  carry;
- ``limit_problems``: the time limits of a worker host that disagree (broker consumer timeout,
  systemd stop timeout, Redis visibility timeout);
- ``broker_use``, ``broker_use_problems``: what the routing table's workers hold on the broker
  (connections, channels, queues), and the broker limits below it;
- ``app_kind``: how to install the application (requirement, file or directory), refused when
  the path it names does not exist on the controller.

Unit tests: tests/unit/plugins/filter/test_stack_rules.py.
"""

import fnmatch
import os
import re

from ansible.errors import AnsibleFilterError
from ansible_collections.celery_stack.core.plugins.module_utils.stack_description import (
    DEFAULT_OVERFLOW, OVERFLOWS, POOLS, PREFORK_ONLY, QUORUM_OVERFLOWS, WORKER_GROUP, is_glob, pool_enabled,
    pool_hosts, routing_table)

QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A source that names a file or directory (not a pip requirement such as "pkg==1.0", nor a URL).
PATH_LIKE = re.compile(r"^(/|\./|\.\./|~)|\.(whl|tar\.gz|zip)$")


def _where(index, queue):
    """How a message names a queue of the table: celery_stack_queues[INDEX] (NAME)."""
    return f"celery_stack_queues[{index}] ({queue.get('name', '')})"


def _queue_name_problems(queues):
    """Queue names: a table with no queue, a name systemd units cannot carry, a name twice."""
    found = []
    if not queues:
        found.append("celery_stack_queues: the routing table lists no queue")
    names = []
    for index, queue in enumerate(queues or []):
        name = queue.get("name", "")
        names.append(name)
        if not QUEUE_NAME.match(name):
            found.append(f"celery_stack_queues[{index}].name {name!r}: letters, digits, '_', '.' and '-' only (it "
                         "names systemd units)")
        if names.count(name) > 1:
            found.append(f"{_where(index, queue)}: the queue name appears twice in the table")
    return found


def _pool_option_problems(queues):
    """Each pool's options: prefork-only options on threads, counts below 1, negative limits, a
    soft time limit not below the hard one. (A pool whose hosts are a string is reported by
    _placement_problems and checked no further.)"""
    found = []
    for index, queue in enumerate(queues or []):
        pools = queue.get("pools") or {}
        for pool in POOLS:
            settings = pools.get(pool) or {}
            pwhere = f"{_where(index, queue)}.pools.{pool}"
            if isinstance(settings.get("hosts"), str):
                continue
            if pool == "threads":
                misplaced = sorted(set(settings) & set(PREFORK_ONLY))
                if misplaced:
                    found.append(f"{pwhere}: the threads pool cannot enforce {', '.join(misplaced)} (Celery "
                                 "ignores them there, celery #9203): move them to prefork or route the task there")
            for option in ("concurrency", "prefetch_multiplier"):
                if option in settings and int(settings[option]) < 1:
                    found.append(f"{pwhere}.{option} must be at least 1, got {settings[option]}")
            for option in PREFORK_ONLY + ("stop_timeout",):
                if option in settings and int(settings[option]) < 0:
                    found.append(f"{pwhere}.{option} must be 0 (off) or more, got {settings[option]}")
            hard, soft = int(settings.get("time_limit", 0)), int(settings.get("soft_time_limit", 0))
            if hard and soft and soft >= hard:
                found.append(f"{pwhere}: soft_time_limit ({soft}) must be below time_limit ({hard})")
    return found


def _placement_problems(queues, groups):
    """Where the workers run: a worker group with no host, hosts given as a string, names that
    are neither hosts nor groups, pools placed outside celery_workers, a queue no enabled pool
    consumes on any worker host."""
    found = []
    workers = list(groups.get(WORKER_GROUP, []))
    if not workers:
        found.append(
            "the inventory has no host in group celery_workers: the brokers and Redis would be set up "
            "for workers that do not exist (Redis would listen on loopback only). Add the worker hosts, "
            "or limit the run (--limit) instead of dropping the group")
    for index, queue in enumerate(queues or []):
        where_named = _where(index, queue)
        hosts_string = isinstance(queue.get("hosts"), str)
        if hosts_string:
            found.append(f"{where_named}.hosts is the string {queue['hosts']!r}: give a list, "
                         f"e.g. [{queue['hosts']!r}]")
        pools = queue.get("pools") or {}
        placed = False
        for pool in POOLS:
            settings = pools.get(pool) or {}
            pwhere = f"{where_named}.pools.{pool}"
            if isinstance(settings.get("hosts"), str):
                found.append(f"{pwhere}.hosts is the string {settings['hosts']!r}: give a list")
                continue
            if not pool_enabled(settings) or hosts_string:
                continue
            try:
                hosts = pool_hosts(queue, pool, groups, index)
            except AnsibleFilterError as error:
                found.append(str(error))
                continue
            strangers = [h for h in hosts if h not in workers]
            if strangers:
                found.append(f"{pwhere}: {', '.join(strangers)} not in group celery_workers (only worker hosts "
                             "run workers)")
            placed = placed or bool(hosts)
        if not placed and not hosts_string:
            found.append(f"{where_named}: no enabled pool runs on any worker host, so its tasks would have no "
                         "consumer (PENDING for ever): enable a pool or place it on a host of celery_workers")
    return found


def _pattern_problems(queues):
    """Route patterns: tasks given as a string, a pattern an earlier queue's glob captures (globs
    are tried in table order), an exact name routed to two queues."""
    found = []
    earlier_globs = []  # (pattern, queue name) of the queues before this one
    exact = {}
    for index, queue in enumerate(queues or []):
        name, where_named = queue.get("name", ""), _where(index, queue)
        tasks = queue.get("tasks")
        if isinstance(tasks, str):
            found.append(f"{where_named}.tasks is the string {tasks!r}: give a list, e.g. [{tasks!r}]")
        tasks = [] if isinstance(tasks, str) else tasks or []
        for pattern in tasks:
            if is_glob(pattern):
                for glob, owner in earlier_globs:
                    if fnmatch.fnmatchcase(pattern, glob):
                        found.append(f"{where_named}.tasks: {pattern!r} is already captured by {glob!r} of queue "
                                     f"{owner} (globs are tried in table order): put the narrower pattern in an "
                                     "earlier queue, or narrow the earlier glob")
            elif pattern in exact and exact[pattern] != name:
                found.append(f"{where_named}.tasks: {pattern!r} is routed to queue {exact[pattern]} already")
            else:
                exact[pattern] = name
        earlier_globs.extend((p, name) for p in tasks if is_glob(p))
    return found


def _default_queue_problems(queues, default_queue):
    """The default queue (unrouted tasks) must be a queue of the table, or empty."""
    names = [queue.get("name", "") for queue in queues or []]
    if default_queue and default_queue not in names:
        return [f"celery_stack_default_queue {default_queue!r} is not a queue of celery_stack_queues: "
                f"unrouted tasks would wait where no worker consumes (one of {names}, or empty)"]
    return []


def _app_source_problems(app):
    """The application source: a path that does not exist, a kind that contradicts it (app_kind)."""
    if not app:
        return []
    try:
        app_kind(str(app.get("source", "")), app.get("kind"))
    except AnsibleFilterError as error:
        return [str(error)]
    return []


def problems(queues, groups, default_queue="", app=None, broker="rabbitmq", quorum=None):
    """Rules across fields of the stack description, as messages naming the inventory variable.

    Run by the preflight (roles/celery_stack) after the argument spec has checked the types, so
    every value has the right shape except where the spec converts silently (a string where a
    list belongs), which is checked here. One function per rule family, in this order.
    """
    return (_queue_name_problems(queues)
            + _pool_option_problems(queues)
            + _placement_problems(queues, groups)
            + _pattern_problems(queues)
            + priority_problems(routing_table(queues or [], broker, quorum, groups.get(broker, [])), broker)
            + length_problems(queues, routing_table(queues or [], "rabbitmq", quorum, groups.get(broker, [])), broker)
            + _default_queue_problems(queues, default_queue)
            + _app_source_problems(app))


def app_kind(source, kind=None):
    """How to install the application: requirement, file or directory (checked on the controller)."""
    if kind == "directory" or (not kind and os.path.isdir(source)):
        if os.path.isfile(source):
            raise AnsibleFilterError(f"celery_stack_app.kind is directory but celery_stack_app.source {source!r} is "
                                     "a file: set kind: file, or leave kind out")
        if not os.path.isdir(source):
            raise AnsibleFilterError(f"celery_stack_app.source {source!r}: no such directory on the controller")
        return "directory"
    if kind == "file" or (not kind and os.path.isfile(source)):
        if os.path.isdir(source):
            raise AnsibleFilterError(f"celery_stack_app.kind is file but celery_stack_app.source {source!r} is a "
                                     "directory: set kind: directory, or leave kind out")
        if not os.path.isfile(source):
            raise AnsibleFilterError(f"celery_stack_app.source {source!r}: no such file on the controller")
        return "file"
    if not kind and PATH_LIKE.search(source):
        raise AnsibleFilterError(
            f"celery_stack_app.source {source!r} looks like a path but nothing exists there on the controller "
            "(relative paths start from the playbook's directory: give an absolute path, e.g. "
            "\"{{ inventory_dir }}/../../app\"); set kind: requirement if it is a pip requirement")
    return "requirement"


def priority_problems(table, broker="rabbitmq"):
    """The routing table's max_priority where the queue cannot carry it, as messages naming the
    variable. RabbitMQ declares x-max-priority on classic queues only (1 to 255; each level is a
    sub-queue, so a few are plenty); quorum queues refuse the argument and have two levels of
    their own (RabbitMQ 4: a priority above 4 is high); kombu's Redis transport has fixed
    priority steps (0 to 9, 0 highest) and ignores the queue argument."""
    found = []
    for index, entry in enumerate(table):
        if entry.get("max_priority") is None:
            continue
        where = f"celery_stack_queues[{index}] ({entry['name']}).max_priority"
        if not 1 <= entry["max_priority"] <= 255:
            found.append(f"{where} must be between 1 and 255, got {entry['max_priority']}")
        elif broker != "rabbitmq":
            found.append(f"{where}: the Redis broker has fixed priority steps (0 to 9, 0 highest) and no per-queue "
                         "maximum; leave max_priority out")
        elif entry["queue_type"] == "quorum":
            found.append(f"{where}: {entry['name']} is a quorum queue, which cannot carry x-max-priority (RabbitMQ "
                         "4 gives quorum queues two priority levels of their own: a priority of 5 or more is high); "
                         "leave max_priority out, or set queue_type: classic on the queue")
    return found


def length_problems(queues, table, broker="rabbitmq"):
    """The routing table's length limits (max_length, max_length_bytes, overflow) where the queue
    cannot carry them, as messages naming the variable. queues: the table as the inventory gives
    it; table: routing_table() of it on RabbitMQ (the queue types).

    - a limit is 1 or more (0 or unset: none); an overflow without a limit does nothing;
    - quorum queues refuse overflow reject-publish-dlx (RabbitMQ accepts drop-head and
      reject-publish there); classic queues take all three;
    - kombu's Redis transport has no queue length limit.
    Not refused: a max_length below the prefetch of the queue's workers (concurrency x
    prefetch_multiplier). RabbitMQ counts ready messages only; the messages a worker holds
    unacknowledged do not count towards the limit, so the workers' prefetch never breaks it."""
    found = []
    for index, (queue, entry) in enumerate(zip(queues or [], table)):
        where = _where(index, queue)
        limits = [key for key in ("max_length", "max_length_bytes") if queue.get(key) not in (None, "")]
        for key in limits:
            if int(queue[key]) < 0:
                found.append(f"{where}.{key} must be 1 or more (0: no limit), got {queue[key]}")
        limited = any(int(queue[key]) > 0 for key in limits)
        overflow = queue.get("overflow")
        if overflow and overflow not in OVERFLOWS:
            found.append(f"{where}.overflow {overflow!r}: one of {', '.join(OVERFLOWS)}")
        elif overflow and not limited:
            found.append(f"{where}.overflow {overflow!r} does nothing without a limit: set max_length (or "
                         "max_length_bytes), or leave overflow out")
        if broker != "rabbitmq" and (limited or overflow):
            found.append(f"{where}: the Redis broker has no queue length limit; leave max_length, "
                         "max_length_bytes and overflow out")
        elif limited and entry["queue_type"] == "quorum" and (overflow or DEFAULT_OVERFLOW) not in QUORUM_OVERFLOWS:
            found.append(f"{where}.overflow {overflow!r}: {queue.get('name', '')} is a quorum queue, which accepts "
                         f"{' or '.join(QUORUM_OVERFLOWS)} only (RabbitMQ refuses the policy); use reject-publish "
                         "(the producer is told), or set queue_type: classic on the queue")
    return found


# What the stack's own processes hold on the broker with the application user, measured on the
# default scenario (molecule/default/tests/test_rabbitmq.py: test_broker_use_per_worker_instance
# asserts that no unit holds more; Celery 5.7, RabbitMQ 4.0, monitoring on, after the scenario's
# tests ran tasks): every worker instance (one queue x pool on one host), prefork and threads
# alike, 3 connections and 6 channels; beat 1 and 1. A host running beat or Flower counts as
# one more instance (Flower, not in that scenario, receives events and sends inspect commands
# like a worker). The preflight compares these, summed over the routing table, with the
# broker's limits. Tasks that publish tasks open more (the producer pool, up to
# broker_pool_limit connections per worker process): the defaults leave room for that.
BROKER_USE_PER_INSTANCE = {"connections": 3, "channels": 6}
BROKER_USE_PER_EXTRA = {"connections": 3, "channels": 6}
# Queues (measured too): per routed queue itself and its <queue>.dead-letter; per worker instance
# its two mailbox queues (celery.pidbox and the producers' mailbox) and its event queue
# (celeryev.<uuid>, gossip); per Flower its event queue; with quorum queues Celery's
# delayed-delivery queues (celery_delayed_0 to _27).
DELAYED_DELIVERY_QUEUES = 28


def broker_use(queues, groups, pool_defaults=None, extras=0, quorum=False):
    """What the routing table's workers hold on the broker with the application user, every worker
    host together: {instances, connections, channels, queues}. extras: the hosts that run beat or
    Flower (each counted with BROKER_USE_PER_EXTRA)."""
    instances = sum(len(worker_instances_of(queues, host, groups, pool_defaults or {}))
                    for host in groups.get(WORKER_GROUP, []))
    use = {key: instances * value + int(extras) * BROKER_USE_PER_EXTRA[key]
           for key, value in BROKER_USE_PER_INSTANCE.items()}
    use["instances"] = instances
    use["queues"] = 2 * len(queues or []) + 3 * instances + int(extras) + (DELAYED_DELIVERY_QUEUES if quorum else 0)
    return use


def worker_instances_of(queues, host, groups, pool_defaults):
    """(queue, pool) of every worker instance on `host` (pool defaults filled in: a pool that they
    switch off runs nowhere)."""
    found = []
    for index, queue in enumerate(queues or []):
        for pool in POOLS:
            settings = dict(pool_defaults.get(pool) or {})
            settings.update((queue.get("pools") or {}).get(pool) or {})
            if pool_enabled(settings) and host in pool_hosts(queue, pool, groups, index):
                found.append((queue["name"], pool))
    return found


def broker_use_problems(use, limits):
    """The broker limits below what the routing table's workers hold (broker_use), one message per
    broker and limit, naming the variable. limits: {broker host: {rabbitmq_<limit>: int}} (the
    brokers' preflight shares them; -1: no limit). A limit the workers reach refuses the next
    worker's connection or channel: that worker restarts in a loop, its queue unserved."""
    checks = (("rabbitmq_app_user_max_connections", "connections"), ("rabbitmq_app_user_max_channels", "channels"),
              ("rabbitmq_vhost_max_connections", "connections"), ("rabbitmq_vhost_max_queues", "queues"))
    found = []
    for broker, settings in sorted((limits or {}).items()):
        for name, key in checks:
            value = (settings or {}).get(name)
            if value is None or int(value) < 0 or int(value) >= use[key]:
                continue
            found.append(f"{name} of {broker} ({int(value)}) is below the {use[key]} {key} that the routing table's "
                         f"{use['instances']} worker instances (queue x pool on every worker host, with beat and "
                         f"Flower) hold on the broker: the worker over the limit would be refused and restart in a "
                         f"loop. Raise {name} (-1: no limit) to at least {use[key]}, with room for tasks that publish "
                         "tasks.")
    return found


def limit_problems(instances, stop_timeout, soft_shutdown_timeout=0, consumer_timeouts=None, visibility_timeout=0):
    """The time limits of one worker host that must agree, each broken rule as a message naming
    both sides. instances: worker_instances() of the host (pool defaults filled in, each with its
    own stop_timeout; a threads worker has no time_limit, 0); stop_timeout: the inventory's one
    figure for every worker (celery_worker_stop_timeout, 0 = each its own); consumer_timeouts: {broker host: rabbitmq_consumer_timeout in ms}
    (RabbitMQ brokers only; None when unknown); visibility_timeout: seconds, Redis broker only.

    - RabbitMQ closes the channel of a delivery unacknowledged for consumer_timeout (celery #6760):
      with late acks a task running longer is redelivered and runs twice, the worker reconnects.
    - systemd kills a worker still running after TimeoutStopSec: the warm shutdown of each worker
      must outlast its longest task (the hard time_limit ends it at the latest) plus the soft
      shutdown.
    - The Redis transport redelivers a message unacknowledged for visibility_timeout: a task still
      running is started again elsewhere.
    """
    limited = [i for i in instances if int(i.get("time_limit") or 0) > 0]
    if not limited:
        return []
    longest = max(limited, key=lambda i: int(i["time_limit"]))
    limit = int(longest["time_limit"])
    where = (f"the time_limit of {longest['instance']} ({limit} s: celery_stack_queues ({longest['queue']})"
             f".pools.{longest['pool']}.time_limit, else celery_worker_pool_defaults.{longest['pool']}.time_limit)")
    found = []
    for broker, timeout in sorted((consumer_timeouts or {}).items()):
        if timeout is not None and int(timeout) <= limit * 1000:
            found.append(f"rabbitmq_consumer_timeout of {broker} ({int(timeout)} ms) must be longer than {where}: "
                         "RabbitMQ would close the channel of a task still running and deliver it again "
                         "(celery #6760). Raise rabbitmq_consumer_timeout or lower the time_limit.")
    soft = float(soft_shutdown_timeout or 0)
    for instance in limited:
        own = int(instance.get("stop_timeout") or 0)
        if own > int(instance["time_limit"]) + soft:
            continue
        source = (f"celery_worker_stop_timeout ({int(stop_timeout)} s, TimeoutStopSec)" if int(stop_timeout or 0) > 0
                  else f"celery_stack_queues ({instance['queue']}).pools.{instance['pool']}.stop_timeout ({own} s, "
                       f"TimeoutStopSec of {instance['instance']}; computed when unset: its time_limit + "
                       "celery_worker_stop_margin)")
        found.append(f"{source} must be longer than the time_limit of {instance['instance']} "
                     f"({int(instance['time_limit'])} s) plus celery_app_soft_shutdown_timeout ({soft:g} s): "
                     "systemd would kill running tasks on a stop.")
    if int(visibility_timeout or 0) and int(visibility_timeout) <= limit:
        found.append(f"celery_app_redis_visibility_timeout ({int(visibility_timeout)} s) must be longer than {where}: "
                     "the Redis broker would deliver a task that still runs to another worker.")
    return found


class FilterModule:
    def filters(self):
        return {f.__name__: f for f in (problems, priority_problems, length_problems, limit_problems, broker_use,
                                        broker_use_problems, app_kind)}
