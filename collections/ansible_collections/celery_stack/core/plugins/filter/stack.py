# -*- coding: utf-8 -*-
"""Every decision derived from the stack description (the inventory's ``celery_stack_*``), once.

The roles call these filters from their defaults and vars; nothing here touches a host, so each
decision is a plain function with unit tests (tests/unit/plugins/filter/test_stack.py, run by
``make test``):

- ``problems``: what the argument spec of roles/celery_stack cannot express (cross-field rules),
  each message naming the inventory variable;
- ``quorum_queues``, ``routing_table``, ``celery_routing``, ``celery_settings``: queue types,
  routes, queue declarations and every other setting of the generated Celery config (the same on
  workers and producers); ``priority_problems``: a max_priority the queue cannot carry;
  ``queue_type_changes``: the queues whose type or maximum priority the broker holds differently;
- ``producer_permissions``: the RabbitMQ permissions of the producers' user (least privilege);
- ``worker_instances``: the systemd worker instances (queue x pool) of one host, pool defaults
  filled in, placement (``hosts:``) applied; ``limit_problems``: the time limits of a worker host
  that disagree (broker consumer timeout, systemd stop timeout, Redis visibility timeout);
- ``broker_url``, ``redis_url``: connection URLs with percent-encoded credentials;
- ``addresses``, ``spread``, ``rabbitmq_nodes``: how a host reaches the hosts of a group and in
  which order it tries the brokers, the cluster's node names; ``host_values``: one variable of several hosts;
- ``redis_broker_keys``, ``app_kind``.
"""

import fnmatch
import json
import os
import re
from urllib.parse import quote

from ansible.errors import AnsibleFilterError

POOLS = ("prefork", "threads")
# Options only the prefork pool enforces (the threads pool ignores them: celery #9203).
PREFORK_ONLY = ("max_tasks_per_child", "max_memory_per_child", "time_limit", "soft_time_limit")
QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
WORKER_GROUP = "celery_workers"
# A source that names a file or directory (not a pip requirement such as "pkg==1.0", nor a URL).
PATH_LIKE = re.compile(r"^(/|\./|\.\./|~)|\.(whl|tar\.gz|zip)$")


def _is_glob(pattern):
    # Celery's MapRoute: a name with "*" is a glob (fnmatch), any other name an exact match.
    return "*" in pattern


def _enabled(pool_settings):
    return quorum_queues((pool_settings or {}).get("enabled", True))


def _placement(names, groups, where):
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


def _pool_hosts(queue, pool, groups, index):
    """The worker hosts that run this queue's pool: the pool's `hosts`, else the queue's, else
    every host of the group celery_workers."""
    settings = (queue.get("pools") or {}).get(pool) or {}
    if "hosts" in settings:
        return _placement(settings["hosts"], groups, f"celery_stack_queues[{index}].pools.{pool}.hosts")
    if "hosts" in queue:
        return _placement(queue["hosts"], groups, f"celery_stack_queues[{index}].hosts")
    return list(groups.get(WORKER_GROUP, []))


def problems(queues, groups, default_queue="", app=None, broker="rabbitmq", quorum=None):
    """Rules across fields of the stack description, as messages naming the inventory variable.

    Run by the preflight (roles/celery_stack) after the argument spec has checked the types, so
    every value has the right shape except where the spec converts silently (a string where a
    list belongs), which is checked here.
    """
    found = []
    workers = list(groups.get(WORKER_GROUP, []))
    if not workers:
        found.append(
            "the inventory has no host in group celery_workers: the brokers and Redis would be set up "
            "for workers that do not exist (Redis would listen on loopback only). Add the worker hosts, "
            "or limit the run (--limit) instead of dropping the group")
    if not queues:
        found.append("celery_stack_queues: the routing table lists no queue")
    names = []
    earlier_globs = []  # (pattern, queue name) of the queues before this one
    exact = {}
    for index, queue in enumerate(queues or []):
        where = f"celery_stack_queues[{index}]"
        name = queue.get("name", "")
        names.append(name)
        where_named = f"{where} ({name})"
        if not QUEUE_NAME.match(name):
            found.append(f"{where}.name {name!r}: letters, digits, '_', '.' and '-' only (it names systemd units)")
        if names.count(name) > 1:
            found.append(f"{where_named}: the queue name appears twice in the table")
        for key in ("tasks", "hosts"):
            if isinstance(queue.get(key), str):
                found.append(f"{where_named}.{key} is the string {queue[key]!r}: give a list, e.g. [{queue[key]!r}]")
        pools = queue.get("pools") or {}
        placed = False
        for pool in POOLS:
            settings = pools.get(pool) or {}
            pwhere = f"{where_named}.pools.{pool}"
            if isinstance(settings.get("hosts"), str):
                found.append(f"{pwhere}.hosts is the string {settings['hosts']!r}: give a list")
                continue
            if pool == "threads":
                misplaced = sorted(set(settings) & set(PREFORK_ONLY))
                if misplaced:
                    found.append(f"{pwhere}: the threads pool cannot enforce {', '.join(misplaced)} (Celery "
                                 "ignores them there, celery #9203): move them to prefork or route the task there")
            for option in ("concurrency", "prefetch_multiplier"):
                if option in settings and int(settings[option]) < 1:
                    found.append(f"{pwhere}.{option} must be at least 1, got {settings[option]}")
            for option in ("max_tasks_per_child", "max_memory_per_child", "time_limit", "soft_time_limit",
                           "stop_timeout"):
                if option in settings and int(settings[option]) < 0:
                    found.append(f"{pwhere}.{option} must be 0 (off) or more, got {settings[option]}")
            hard, soft = int(settings.get("time_limit", 0)), int(settings.get("soft_time_limit", 0))
            if hard and soft and soft >= hard:
                found.append(f"{pwhere}: soft_time_limit ({soft}) must be below time_limit ({hard})")
            if not _enabled(settings) or isinstance(queue.get("hosts"), str):
                continue
            try:
                hosts = _pool_hosts(queue, pool, groups, index)
            except AnsibleFilterError as error:
                found.append(str(error))
                continue
            strangers = [h for h in hosts if h not in workers]
            if strangers:
                found.append(f"{pwhere}: {', '.join(strangers)} not in group celery_workers (only worker hosts "
                             "run workers)")
            placed = placed or bool(hosts)
        if not placed and not isinstance(queue.get("hosts"), str):
            found.append(f"{where_named}: no enabled pool runs on any worker host, so its tasks would have no "
                         "consumer (PENDING for ever): enable a pool or place it on a host of celery_workers")
        tasks = queue.get("tasks") or []
        if isinstance(tasks, str):
            tasks = []
        for pattern in tasks:
            if _is_glob(pattern):
                for glob, owner in earlier_globs:
                    if fnmatch.fnmatchcase(pattern, glob):
                        found.append(f"{where_named}.tasks: {pattern!r} is already captured by {glob!r} of queue "
                                     f"{owner} (globs are tried in table order): put the narrower pattern in an "
                                     "earlier queue, or narrow the earlier glob")
            elif pattern in exact and exact[pattern] != name:
                found.append(f"{where_named}.tasks: {pattern!r} is routed to queue {exact[pattern]} already")
            else:
                exact[pattern] = name
        earlier_globs.extend((p, name) for p in tasks if _is_glob(p))
    found.extend(priority_problems(routing_table(queues or [], broker, quorum, groups.get(broker, [])), broker))
    if default_queue and default_queue not in names:
        found.append(f"celery_stack_default_queue {default_queue!r} is not a queue of celery_stack_queues: "
                     f"unrouted tasks would wait where no worker consumes (one of {names}, or empty)")
    if app:
        source, kind = str(app.get("source", "")), app.get("kind")
        try:
            app_kind(source, kind)
        except AnsibleFilterError as error:
            found.append(str(error))
    return found


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


def quorum_queues(setting, brokers=()):
    """Quorum queues (replicated) when the inventory says so, else when there is more than one broker."""
    if setting is None or setting == "":
        return len(brokers or []) > 1
    if isinstance(setting, str):
        return setting.strip().lower() in ("true", "yes", "on", "1")
    return bool(setting)


def routing_table(queues, broker="rabbitmq", quorum=None, brokers=()):
    """Per queue: name, task patterns, the RabbitMQ queue type (None on a Redis broker: the
    queue's own queue_type, else quorum_queues(quorum, brokers)) and max_priority (None: no
    priorities). The workers' config and the broker's queue check both come from here, so they
    cannot disagree."""
    default_type = "quorum" if quorum_queues(quorum, brokers) else "classic"
    return [{"name": queue["name"], "tasks": list(queue.get("tasks") or []),
             "queue_type": (queue.get("queue_type") or default_type) if broker == "rabbitmq" else None,
             "max_priority": int(queue.get("max_priority") or 0) or None}
            for queue in queues]


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


def queue_type_changes(wanted, listings):
    """The routed queues that exist on the broker with another type or maximum priority than the
    table's: RabbitMQ refuses to redeclare a queue with other arguments (PRECONDITION_FAILED).

    wanted: rabbitmq_stack_queues ({vhost, name, queue_type, max_priority}); listings: the
    registered results of `rabbitmqctl list_queues -p VHOST name type arguments --formatter json`,
    one per vhost (item = vhost). Each change: the queue with existing and wanted, in the same
    words ("a classic queue", "a classic queue with max_priority 10", "a quorum queue").
    """
    def words(queue_type, max_priority):
        return f"a {queue_type} queue" + (f" with max_priority {max_priority}" if max_priority else "")

    existing = {(result["item"], queue["name"]): queue for result in listings
                for queue in json.loads(result["stdout"] or "[]")}
    changes = []
    for queue in wanted:
        found = existing.get((queue["vhost"], queue["name"]))
        if found is None:
            continue
        arguments = found.get("arguments") or {}
        if isinstance(arguments, list):  # rabbitmqctl's JSON: [[name, type, value], ...]
            arguments = {argument[0]: argument[-1] for argument in arguments}
        have = words(found["type"], arguments.get("x-max-priority"))
        want = words(queue["queue_type"], queue.get("max_priority"))
        if have != want:
            changes.append(dict(queue, existing=have, wanted=want))
    return changes


def celery_routing(table, default_queue=""):
    """The routing part of the generated Celery settings (JSON-able; the module on the host turns
    the queue entries into kombu Queues): routes in table order, one topic exchange per queue,
    bound with the queue's name, and the queue that unrouted tasks go to."""
    default = default_queue or (table[0]["name"] if table else "celery")
    return {
        "task_routes": [[pattern, entry["name"]] for entry in table for pattern in entry["tasks"]],
        "task_queues": [{"name": entry["name"], "exchange": entry["name"], "exchange_type": "topic",
                         "routing_key": entry["name"], "queue_type": entry["queue_type"],
                         "max_priority": entry.get("max_priority")} for entry in table],
        "task_default_queue": default,
        "task_default_exchange": default,
        "task_default_exchange_type": "topic",
        "task_default_routing_key": default,
        "quorum": any(entry["queue_type"] == "quorum" for entry in table),
    }


# Every process of the application, on any result backend: a result the worker cannot store
# while the result store is briefly away (a restart, a failover) is retried with backoff until it
# is stored, instead of leaving the task STARTED for ever or recorded FAILURE with the
# ConnectionError. Celery's defaults for the retry count (no limit) and the backoff (10 ms,
# doubling, at most 10 s) stay: a task's pool slot waits for the store to come back, which is
# all it could do anyway.
RESULT_STORE_RETRIES = {"result_backend_always_retry": True}

# The Redis result store's client (redis-py under Celery's backend):
REDIS_RESULT_CLIENT = {
    # PING a connection idle for 5 s before using it again, also the pub/sub connection that
    # get() listens on: after a restart of the store the client notices the dead connection and
    # resubscribes within seconds, instead of waiting on it until get()'s own timeout.
    "redis_backend_health_check_interval": 5,
    # TCP keepalive: a connection to a host that went away (crash, power loss) is found dead.
    "redis_socket_keepalive": True,
    # A connect to a host that is down fails after 5 s and is retried, rather than after the
    # operating system's SYN retries (about two minutes).
    "redis_socket_connect_timeout": 5,
    # A command that timed out is sent again once on a new connection.
    "redis_retry_on_timeout": True,
}

# Monitoring (celery_stack_monitoring): workers send task events (received, started, succeeded,
# failed, retried) and producers task-sent, so Flower sees every task from the moment it is sent.
# Events go to the celeryev exchange and into the queue of each monitor that listens; with no
# monitor they are dropped, and Celery's event queues expire (message TTL 5 s, queue 60 s after
# its monitor left), so a monitor that is away makes nothing pile up on the broker.
TASK_EVENTS = {"worker_send_task_events": True, "task_send_sent_event": True}


# Revoke from producer hosts (celery_stack_worker.py, section "Revoke from producer hosts"): on
# RabbitMQ the producers' control commands go to a mailbox of their own, <name>.pidbox, where the
# workers accept revoke only, instead of Celery's celery.pidbox with every remote-control command.
PRODUCER_CONTROL_EXCHANGE = "celery-stack-producers"


def celery_settings(table, default_queue="", broker="rabbitmq", options=None, visibility_timeout=3600,
                    result_backend="redis", monitoring=False, producer=False):
    """The generated Celery settings, secrets aside (JSON-able): what celery_stack_config.apply()
    sets on every host, worker or producer, so both publish and consume with the same routes,
    queues and delivery guarantees.

    options: the reliability settings by their Celery names (task_acks_late, ...), from the
    celery_app role's variables; they win over the derived ones below.
    - RabbitMQ: publisher confirms on every queue type. The broker confirms a persistent message
      only once it is on disk (classic queue) or on a majority of nodes (quorum queue); without
      confirms a broker crash loses what it had accepted but not yet written (measured: 839 of
      1,000 queued tasks after a SIGKILL of the broker host, 0 with confirms). Routed queues
      that are quorum queues make the default queue type quorum too.
      The producers' mailbox (PRODUCER_CONTROL_EXCHANGE): workers listen on it, a producer
      (producer: true) sends its control commands (revoke) there.
    - Redis broker: the visibility timeout.
    - Results: RESULT_STORE_RETRIES; on Redis also REDIS_RESULT_CLIENT.
    - monitoring: TASK_EVENTS.
    """
    routing = celery_routing(table, default_queue)
    settings = {name: value for name, value in routing.items() if name != "quorum"}
    settings.update(RESULT_STORE_RETRIES)
    if result_backend == "redis":
        settings.update(REDIS_RESULT_CLIENT)
    if broker == "rabbitmq":
        settings["broker_transport_options"] = {"confirm_publish": True}
        if routing["quorum"]:
            settings["task_default_queue_type"] = "quorum"
        settings["celery_stack_producer_control_exchange"] = PRODUCER_CONTROL_EXCHANGE
        if producer:
            settings["control_exchange"] = PRODUCER_CONTROL_EXCHANGE
    elif broker == "redis":
        settings["broker_transport_options"] = {"visibility_timeout": int(visibility_timeout)}
    if monitoring:
        settings.update(TASK_EVENTS)
    settings.update(options or {})
    return settings


def visibility_timeout(queues, setting=0):
    """Redis broker: how long an unacknowledged message waits before it is delivered again. It
    must exceed the longest task: `setting` when > 0, else 4 x the longest time_limit the routing
    table sets, at least one hour."""
    if int(setting or 0) > 0:
        return int(setting)
    limits = [int(((queue.get("pools") or {}).get(pool) or {}).get("time_limit") or 0)
              for queue in queues for pool in POOLS]
    return max([3600] + [4 * limit for limit in limits])


# UUIDs: the reply queues of the rpc result backend (one per client, named by its thread oid).
UUID_QUEUE = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def producer_permissions(table, result_backend="redis", events=False):
    """RabbitMQ permissions (configure, write, read regexes) of the producers' user: publish to
    the routed queues' exchanges and nothing more.

    - write: the exchanges of the routed queues (named like the queues), and with quorum queues
      Celery's delayed-delivery exchanges (celery_delayed_<level>: countdown/ETA tasks);
    - configure: nothing (but the celeryev exchange, see below). The producers' settings never
      declare (the workers declare the queues),
      so an application that ignores the routing table and publishes to Celery's default queue
      `celery` is refused (ACCESS_REFUSED raised by .delay()) instead of creating a queue that no
      worker consumes, where its tasks would stay PENDING for ever;
    - read: nothing, so a producer cannot consume (take) tasks;
    - revoke(): configure and write on the producers' mailbox exchange
      (PRODUCER_CONTROL_EXCHANGE.pidbox, declared before each command), where workers accept
      revoke and nothing else. Other remote control (inspect, ping) needs a reply queue to read:
      refused.
    With the rpc result backend the client declares and reads its own reply queue (a UUID). With
    task events on (monitoring), the producer publishes task-sent events to the celeryev exchange,
    which Celery declares before its first event on a connection (configure on that exchange
    only: refused, the broker closes the channel and the event is lost).
    """
    names = [re.escape(entry["name"]) for entry in table]
    if events:
        names.append("celeryev")
    if any(entry.get("queue_type") == "quorum" for entry in table):
        names.append("celery_delayed_[0-9]+")
    mailbox = re.escape(f"{PRODUCER_CONTROL_EXCHANGE}.pidbox")
    names.append(mailbox)
    replies = [UUID_QUEUE] if result_backend == "rpc" else []
    declared = replies + (["celeryev"] if events else []) + [mailbox]
    return {"configure": f"^({'|'.join(declared)})$",
            "write": f"^({'|'.join(names)})$",
            "read": f"^({'|'.join(replies)})$" if replies else "^$"}


def _stop_timeout(pool, settings, stop_timeout, stop_margin):
    """TimeoutStopSec of one worker: how long its warm shutdown (running tasks finish) may take.
    The inventory's one figure (celery_worker_stop_timeout) when set, else the pool's own
    stop_timeout, else for prefork its hard time_limit (the longest a task can run there) plus
    the margin; a threads worker has no time limit: its stop_timeout says how long its tasks may
    take to finish."""
    if int(stop_timeout or 0) > 0:
        return int(stop_timeout)
    if int(settings.get("stop_timeout") or 0) > 0:
        return int(settings["stop_timeout"])
    limit = int(settings.get("time_limit") or 0) if pool == "prefork" else 0
    return limit + int(stop_margin)


def worker_instances(queues, host, groups, pool_defaults, prefetch_multiplier=1, stop_timeout=0, stop_margin=60):
    """The worker instances of `host`: one per queue x enabled pool placed on it, in table order.

    Pool settings are the table's over `pool_defaults` (celery_worker_pool_defaults); prefork-only
    options are 0 (off) for threads workers. stop_timeout: each worker's own (_stop_timeout).
    """
    instances = []
    for index, queue in enumerate(queues):
        for pool in POOLS:
            settings = dict(pool_defaults.get(pool) or {})
            settings.update((queue.get("pools") or {}).get(pool) or {})
            if not _enabled(settings) or host not in _pool_hosts(queue, pool, groups, index):
                continue
            instance = {
                "instance": f"{queue['name']}-{pool}",
                "queue": queue["name"],
                "pool": pool,
                "concurrency": int(settings.get("concurrency", 1)),
                "prefetch_multiplier": int(settings.get("prefetch_multiplier", prefetch_multiplier)),
            }
            for option in PREFORK_ONLY:
                instance[option] = int(settings.get(option, 0)) if pool == "prefork" else 0
            instance["stop_timeout"] = _stop_timeout(pool, settings, stop_timeout, stop_margin)
            instances.append(instance)
    return instances


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


def _credentials(user, password):
    # quote(safe="") encodes every reserved character, "/" included (Jinja's urlencode keeps it).
    return f"{quote(str(user), safe='')}:{quote(str(password), safe='')}@" if user or password else ""


def broker_url(hosts, broker="rabbitmq", user="", password="", vhost="/", db=0, port=None):
    """Every broker host, `;`-separated, so kombu fails over between them."""
    scheme, default_port = ("amqp", 5672) if broker == "rabbitmq" else ("redis", 6379)
    path = quote(str(vhost), safe="") if broker == "rabbitmq" else str(int(db))
    port = int(port or default_port)
    return ";".join(f"{scheme}://{_credentials(user, password)}{h}:{port}/{path}" for h in hosts)


def redis_url(host, port=6379, db=0, user="", password=""):
    return f"redis://{_credentials(user, password)}{host}:{int(port)}/{int(db)}"


def addresses(hosts, inventory_hostname, hostvars):
    """How `inventory_hostname` reaches each host: itself on 127.0.0.1, the others by their
    celery_stack_address (default: the inventory name, resolved by DNS)."""
    return ["127.0.0.1" if h == inventory_hostname else (hostvars[h].get("celery_stack_address") or h)
            for h in hosts]


def spread(hosts, client, clients):
    """The broker hosts in the order `client` tries them: this host first when it is one of them,
    else rotated by the client's place among all clients, so that the clients (worker and
    producer hosts) connect to the brokers round-robin instead of all to the first. The others
    stay in the list: kombu fails over to the next one."""
    hosts = list(hosts)
    if not hosts:
        return hosts
    if client in hosts:
        start = hosts.index(client)
    else:
        start = list(clients).index(client) % len(hosts) if client in clients else 0
    return hosts[start:] + hosts[:start]


def host_values(hosts, hostvars, name):
    """{host: that host's variable `name`, None where it has none} (hostvars[h].name would fail)."""
    return {h: hostvars[h].get(name) for h in hosts}


def rabbitmq_nodes(hosts, hostvars):
    """Node names as RabbitMQ names them: rabbit@<short host name> (from the facts the preflight
    gathered; without them, e.g. under --limit, from the inventory name)."""
    nodes = []
    for h in hosts:
        name = hostvars[h].get("rabbitmq_nodename") or "rabbit"
        if "@" not in name:
            facts = hostvars[h].get("ansible_facts") or {}
            name = f"{name}@{facts.get('hostname') or h.split('.')[0]}"
        nodes.append(name)
    return nodes


def redis_broker_keys(queue_names):
    """Keys of kombu's Redis transport for these queues (and Celery's default queue "celery"), each
    with its priority variants QUEUE\\x06\\x16{3,6,9} (glob QUEUE??[369])."""
    names = list(dict.fromkeys(list(queue_names) + ["celery"]))
    return [f"{name}{suffix}" for name in names for suffix in ("", "??[369]")]


# Poison tasks (celery_stack_worker.py, section "Poison tasks"): the exchange and queues the
# workers declare, and the policy that makes RabbitMQ dead-letter into them.
DEAD_LETTER_EXCHANGE = "celery-stack.dead-letter"
DEAD_LETTER_SUFFIX = ".dead-letter"


def dead_letter_policies(queues, delivery_limit=20, priority=0):
    """One RabbitMQ policy per routed queue ({vhost, name, pattern, tags, priority}, for
    community.rabbitmq.rabbitmq_policy): a message rejected without requeue (a poison task at the
    workers' limit, an unknown task) or over a quorum queue's delivery limit goes to the
    dead-letter exchange with the queue's name as routing key, so into <queue>.dead-letter.

    queues: rabbitmq_stack_queues ({vhost, name, queue_type}). delivery-limit on quorum queues
    only (classic queues have none): a safety net above the workers' own limit, for deaths the
    workers cannot count (the whole worker process killed). The pattern is the exact name, so it
    never matches the dead-letter queue itself. RabbitMQ applies ONE policy per queue (the
    highest priority): another policy matching a routed queue must carry these keys too.
    """
    if int(delivery_limit) < 1:
        raise AnsibleFilterError(f"the quorum delivery limit must be at least 1, got {delivery_limit!r}")
    policies = []
    for queue in queues:
        tags = {"dead-letter-exchange": DEAD_LETTER_EXCHANGE, "dead-letter-routing-key": queue["name"]}
        if queue.get("queue_type") == "quorum":
            tags["delivery-limit"] = int(delivery_limit)
        policies.append({"vhost": queue["vhost"], "name": f"celery-stack-dead-letter-{queue['name']}",
                         "pattern": f"^{re.escape(queue['name'])}$", "tags": tags, "priority": str(int(priority))})
    return policies


def stale_dead_letter_policies(listings, wanted):
    """The dead-letter policies of this bundle ({vhost, name}) that exist on the broker but are no
    longer wanted (their queue left the routing table). listings: the registered results of
    `rabbitmqctl list_policies -p VHOST --formatter json`, one per vhost (item = vhost)."""
    keep = {(policy["vhost"], policy["name"]) for policy in wanted}
    return [{"vhost": result["item"], "name": policy["name"]} for result in listings
            for policy in json.loads(result["stdout"] or "[]")
            if policy["name"].startswith("celery-stack-dead-letter-") and (result["item"], policy["name"]) not in keep]


class FilterModule:
    def filters(self):
        return {f.__name__: f for f in (
            problems, app_kind, quorum_queues, routing_table, priority_problems, queue_type_changes, celery_routing, celery_settings,
            visibility_timeout, producer_permissions, worker_instances, limit_problems,
            broker_url, redis_url, addresses, spread, host_values, rabbitmq_nodes, redis_broker_keys,
            dead_letter_policies, stale_dead_letter_policies)}
