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
- ``limit_problems``: the time limits of a worker host that disagree (broker consumer timeout,
  systemd stop timeout, Redis visibility timeout);
- ``app_kind``: how to install the application (requirement, file or directory), refused when
  the path it names does not exist on the controller.

Unit tests: tests/unit/plugins/filter/test_stack_rules.py.
"""

import fnmatch
import os
import re

from ansible.errors import AnsibleFilterError
from ansible_collections.celery_stack.core.plugins.module_utils.stack_description import (
    POOLS, PREFORK_ONLY, WORKER_GROUP, is_glob, pool_enabled, pool_hosts, routing_table)

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
        return {f.__name__: f for f in (problems, priority_problems, limit_problems, app_kind)}
