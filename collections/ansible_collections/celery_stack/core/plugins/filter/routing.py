# -*- coding: utf-8 -*-
"""THE routing table, typed, and what every host derives from it.

- ``quorum_queues``, ``routing_table``: the queue types and the typed table (the functions
  live in plugins/module_utils/stack_description.py, shared with the preflight's rules; the
  roles read the table once, as celery_stack__routing_table of roles/celery_stack);
- ``celery_routing``, ``celery_settings``, ``visibility_timeout``: routes, queue declarations
  and every other setting of the generated Celery config (the same on workers and producers);
- ``worker_instances``: the systemd worker instances (queue x pool) of one host, pool defaults
  filled in, placement (``hosts:``) applied, each with its own stop timeout.

Nothing here touches a host. Unit tests: tests/unit/plugins/filter/test_routing.py.
"""

from ansible_collections.celery_stack.core.plugins.module_utils.stack_description import (
    POOLS, PREFORK_ONLY, PRODUCER_CONTROL_EXCHANGE, pool_enabled, pool_hosts, quorum_queues, routing_table)


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
            if not pool_enabled(settings) or host not in pool_hosts(queue, pool, groups, index):
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


class FilterModule:
    def filters(self):
        return {f.__name__: f for f in (
            quorum_queues, routing_table, celery_routing, celery_settings, visibility_timeout, worker_instances)}
