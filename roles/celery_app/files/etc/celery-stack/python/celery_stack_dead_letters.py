# Managed by Ansible (role celery_app of celery-stack): local changes are overwritten.
"""Inspect and replay the dead-lettered task messages of a routed queue (<queue>.dead-letter).

Run on a worker host as root or as the application's user (it reads the deployment's broker
settings; it connects as the workers' user)::

    /opt/celery-stack/venv/bin/python -m celery_stack_dead_letters list io
    /opt/celery-stack/venv/bin/python -m celery_stack_dead_letters replay io --id TASK_ID
    /opt/celery-stack/venv/bin/python -m celery_stack_dead_letters replay io --all

``list`` shows each message (task id, task name, the earlier deaths the workers counted: the
header of the message as delivered the last time, so limit - 1 for a poison task, whose last
death rejected it; why RabbitMQ dead-lettered it, "rejected" or "delivery_limit", and when) and
leaves it in place. ``replay`` publishes the chosen messages back
to their queue (the default exchange, routed by the queue's name, with publisher confirms),
without the workers' death count, so they get the whole limit again, then removes them from the
dead-letter queue. Replay only after the cause is fixed: a task that still kills its process
comes back to the dead-letter queue after the same number of attempts. A replayed task keeps its
id: its FAILURE result is replaced by the outcome of the new run.
"""

import argparse
import json
import sys

# The names the workers count and dead-letter with (celery_stack_worker.py, next to this file).
from celery_stack_worker import BROKER_HEADERS, COPIED_PROPERTIES, DEAD_LETTER_SUFFIX, DEATHS_HEADER
from kombu import Connection

# Set by RabbitMQ on delivery, or the workers' count: a replayed message starts afresh.
DROPPED_HEADERS = (DEATHS_HEADER, *BROKER_HEADERS)


def summary(message):
    """What an operator needs to know about one dead-lettered message (JSON-able)."""
    headers = message.headers or {}
    death = (headers.get("x-death") or [{}])[0]
    return {"id": headers.get("id"), "task": headers.get("task"), "earlier_deaths": headers.get(DEATHS_HEADER, 0),
            "reason": death.get("reason"), "from": death.get("queue"), "count": death.get("count"),
            "dead_lettered_at": str(death.get("time")) if death.get("time") is not None else None}


def replay_arguments(message, queue):
    """publish() arguments of the replayed copy: same body and properties, to ``queue``."""
    headers = {name: value for name, value in (message.headers or {}).items() if name not in DROPPED_HEADERS}
    properties = {name: message.properties[name] for name in COPIED_PROPERTIES
                  if message.properties.get(name) is not None}
    return {"body": message.body, "exchange": "", "routing_key": queue, "headers": headers,
            "content_type": message.content_type, "content_encoding": message.content_encoding, **properties}


def walk(connection, queue, choose, act):
    """Every message of <queue>.dead-letter, once: ``act(message)`` where ``choose(summary)``,
    then acknowledged (removed); the others are held until every message has been seen (so no
    message comes twice), then put back. Returns the summaries of the chosen ones (all of them
    for a listing: act None, nothing removed)."""
    chosen, held = [], []
    channel = connection.channel()
    try:
        while True:
            message = channel.basic_get(queue + DEAD_LETTER_SUFFIX, no_ack=False)
            if message is None:
                break
            # basic_get of the virtual transports gives the raw message; AMQP a kombu Message.
            message = channel.message_to_python(message) if not hasattr(message, "ack") else message
            info = summary(message)
            if act is None or not choose(info):
                held.append(message)
            if not choose(info):
                continue
            chosen.append(info)
            if act is not None:
                act(message)
                message.ack()
        for message in held:
            message.requeue()
    finally:
        channel.close()  # AMQP returns whatever is still unacknowledged (an error above)
    return chosen


def broker_connection():
    import celery_stack_config

    conf = celery_stack_config.settings()
    # TLS as every client of the deployment (celery_stack_tls): the CA checked, and the name.
    return Connection(conf["broker_url"], ssl=conf.get("broker_use_ssl") or False,
                      transport_options=conf.get("broker_transport_options") or {})


def main(argv=None, connection=None):
    parser = argparse.ArgumentParser(prog="celery_stack_dead_letters", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["list", "replay"])
    parser.add_argument("queue", help="the routed queue (its dead-letter queue is <queue>.dead-letter)")
    parser.add_argument("--id", action="append", default=[], help="replay this task id (repeatable)")
    parser.add_argument("--all", action="store_true", help="replay every message")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if args.command == "replay" and not (args.id or args.all):
        parser.error("replay needs --id TASK_ID or --all")
    connection = connection or broker_connection()
    with connection:
        if args.command == "list":
            found = walk(connection, args.queue, lambda info: True, None)
        else:
            producer = connection.Producer()
            wanted = set(args.id)
            found = walk(connection, args.queue, lambda info: args.all or info["id"] in wanted,
                         lambda message: producer.publish(**replay_arguments(message, args.queue)))
    for info in found:
        print(json.dumps(info) if args.json else
              f"{info['id']}  {info['task']}  earlier_deaths={info['earlier_deaths']}  reason={info['reason']}"
              f"  at={info['dead_lettered_at']}")
    if args.command == "replay":
        print(f"replayed {len(found)} message(s) to {args.queue}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
