# -*- coding: utf-8 -*-
"""The broker's side of the stack (RabbitMQ): users' permissions, queue checks, policies, nodes.

- ``producer_permissions``: the RabbitMQ permissions of the producers' user (least privilege);
- ``user_permissions``: a user's permissions as the role sets them (a regex not given: "^$");
- ``queue_type_changes``: the routed queues the broker holds with another type or maximum
  priority than the routing table's;
- ``dead_letter_policies``, ``dead_letter_policies_to_clear``: the policies that dead-letter the
  routed queues, and those of queues that left the table;
- ``users_to_set``, ``vhosts_to_create``, ``policies_to_set``: what differs between the
  inventory and the broker, so a run that changes nothing runs no rabbitmqctl per user, vhost
  or policy;
- ``broker_limits``, ``limits_to_set``: the limits of the stack's vhost and users, and those
  the broker holds otherwise (tasks/limits.yml);
- ``rabbitmq_nodes``: the cluster's node names.

What the broker has comes from ONE read, ``rabbitmqctl export_definitions`` (its JSON, parsed:
users with their password hashes, permissions, vhosts, policies, queues; tasks/definitions.yml).

Nothing here touches a host. Unit tests: tests/unit/plugins/filter/test_rabbitmq.py.
"""

import base64
import hashlib
import json
import re

from ansible.errors import AnsibleFilterError
from ansible_collections.celery_stack.core.plugins.module_utils.stack_description import (
    DEFAULT_OVERFLOW, PRODUCER_CONTROL_EXCHANGE)


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


def queue_type_changes(wanted, definitions):
    """The routed queues that exist on the broker with another type or maximum priority than the
    table's: RabbitMQ refuses to redeclare a queue with other arguments (PRECONDITION_FAILED).

    wanted: rabbitmq_stack_queues ({vhost, name, queue_type, max_priority}); definitions: the
    broker's (export_definitions). Each change: the queue with existing and wanted, in the same
    words ("a classic queue", "a classic queue with max_priority 10", "a quorum queue").
    """
    def words(queue_type, max_priority):
        return f"a {queue_type} queue" + (f" with max_priority {max_priority}" if max_priority else "")

    existing = {(queue["vhost"], queue["name"]): queue for queue in definitions.get("queues") or []}
    changes = []
    for queue in wanted:
        found = existing.get((queue["vhost"], queue["name"]))
        if found is None:
            continue
        arguments = found.get("arguments") or {}
        queue_type = found.get("type") or arguments.get("x-queue-type") or "classic"
        have = words(queue_type, arguments.get("x-max-priority"))
        want = words(queue["queue_type"], queue.get("max_priority"))
        if have != want:
            changes.append(dict(queue, existing=have, wanted=want))
    return changes


# Poison tasks (celery_stack_worker.py, section "Poison tasks"): the exchange the workers declare
# (with the queues <queue>.dead-letter: DEAD_LETTER_SUFFIX), and the policy that makes RabbitMQ
# dead-letter into them.
DEAD_LETTER_EXCHANGE = "celery-stack.dead-letter"
# The name of each queue's policy: this prefix and the queue's name.
DEAD_LETTER_POLICY_PREFIX = "celery-stack-dead-letter-"


def dead_letter_policies(queues, delivery_limit=20, priority=0):
    """One RabbitMQ policy per routed queue ({vhost, name, pattern, tags, priority}, for
    community.rabbitmq.rabbitmq_policy): a message rejected without requeue (a poison task at the
    workers' limit, an unknown task) or over a quorum queue's delivery limit goes to the
    dead-letter exchange with the queue's name as routing key, so into <queue>.dead-letter.

    queues: rabbitmq_stack_queues ({vhost, name, queue_type, and max_length, max_length_bytes,
    overflow where the table sets them: max-length, max-length-bytes, overflow in the same policy}).
    delivery-limit on quorum queues
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
        # The queue's length limits (the routing table's max_length, max_length_bytes, overflow)
        # go into this same policy: RabbitMQ applies one policy per queue, so a second policy
        # would replace the dead-lettering. A queue without them keeps exactly the keys above.
        for key in ("max_length", "max_length_bytes"):
            if queue.get(key):
                tags[key.replace("_", "-")] = int(queue[key])
        if queue.get("max_length") or queue.get("max_length_bytes"):
            tags["overflow"] = queue.get("overflow") or DEFAULT_OVERFLOW
        policies.append({"vhost": queue["vhost"], "name": f"{DEAD_LETTER_POLICY_PREFIX}{queue['name']}",
                         "pattern": f"^{re.escape(queue['name'])}$", "tags": tags, "priority": str(int(priority))})
    return policies


def dead_letter_policies_to_clear(definitions, wanted):
    """The dead-letter policies of this bundle ({vhost, name}) that exist on the broker but are no
    longer wanted (their queue left the routing table). definitions: the broker's."""
    keep = {(policy["vhost"], policy["name"]) for policy in wanted}
    return [{"vhost": policy["vhost"], "name": policy["name"]} for policy in definitions.get("policies") or []
            if policy["name"].startswith(DEAD_LETTER_POLICY_PREFIX) and (policy["vhost"], policy["name"]) not in keep]


def policies_to_set(definitions, wanted):
    """The wanted policies (dead_letter_policies' shape, applied to queues) that the broker lacks
    or holds with another pattern, definition or priority."""
    existing = {(p["vhost"], p["name"]): p for p in definitions.get("policies") or []}
    differ = []
    for policy in wanted:
        found = existing.get((policy["vhost"], policy["name"]))
        if (found is None or found.get("pattern") != policy["pattern"] or found.get("apply-to") != "queues"
                or found.get("definition") != policy["tags"] or int(found.get("priority", 0)) != int(policy["priority"])):
            differ.append(policy)
    return differ


def broker_limits(settings, vhosts, app_user, producer_user=""):
    """The limits of the stack's vhosts and users, for tasks/limits.yml: {vhosts: [{vhost,
    max_connections, max_queues}], users: [{user, max_connections, max_channels}]}. settings: the
    rabbitmq_*_max_* variables without the prefix (vhost_max_connections, ...); -1: no limit.
    producer_user: "" when the stack has no producers' user."""
    def limit(name):
        return max(int(settings[name]), -1)
    users = [{"user": app_user, "max_connections": limit("app_user_max_connections"),
              "max_channels": limit("app_user_max_channels")}]
    if producer_user:
        users.append({"user": producer_user, "max_connections": limit("producer_user_max_connections"),
                      "max_channels": limit("producer_user_max_channels")})
    return {"vhosts": [{"vhost": vhost, "max_connections": limit("vhost_max_connections"),
                        "max_queues": limit("vhost_max_queues")} for vhost in dict.fromkeys(vhosts)],
            "users": users}


def _read_limits(stdout):
    """`rabbitmqctl list_vhost_limits` / `list_user_limits --user` output -> {name: value}. No
    limits: empty output, {} or [] depending on the version."""
    text = (stdout or "").strip()
    if not text:
        return {}
    try:
        found = json.loads(text)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def limits_to_set(results):
    """The wanted limits (each result's item: {vhost or user, max_<limit>: int, -1 none}) that the
    broker holds otherwise (each result's stdout: the read). A limit the broker lacks and one it
    holds as a negative number both mean none. A failed read (a user or vhost that a dry run has
    not created) counts as no limits."""
    differ = []
    for result in results or []:
        wanted = result["item"]
        have = _read_limits(result.get("stdout")) if result.get("rc", 0) == 0 else {}
        for key, value in wanted.items():
            if not key.startswith("max_"):
                continue
            held = have.get(key.replace("_", "-"))
            held = -1 if held is None or int(held) < 0 else int(held)
            if held != int(value):
                differ.append(wanted)
                break
    return differ


def vhosts_to_create(definitions, vhosts):
    """The vhosts the broker does not have yet."""
    have = {vhost["name"] for vhost in definitions.get("vhosts") or []}
    return [vhost for vhost in vhosts if vhost not in have]


def user_permissions(permissions):
    """A user's permissions as the role sets them: every regex not given is "^$" (matches no
    resource: least privilege). The users task and users_to_set both read this."""
    return [dict({"configure": "^$", "write": "^$", "read": "^$"}, **entry) for entry in permissions or []]


# RabbitMQ's password hashes: base64 of a 4-byte salt and the digest of salt + password.
_HASHES = {"rabbit_password_hashing_sha256": hashlib.sha256, "rabbit_password_hashing_sha512": hashlib.sha512}


def _password_matches(user, password):
    digest = _HASHES.get(user.get("hashing_algorithm"))
    try:
        raw = base64.b64decode(user.get("password_hash") or "")
    except ValueError:
        return False
    if digest is None or len(raw) < 5:
        return False  # another algorithm: let the module find out (it authenticates)
    salt = raw[:4]
    return raw[4:] == digest(salt + str(password).encode("utf-8")).digest()


def _tags(tags):
    """Tags as a list (older brokers export them as one comma-separated string)."""
    if isinstance(tags, str):
        return [tag for tag in tags.split(",") if tag]
    return list(tags or [])


def users_to_set(definitions, users):
    """The users ({name, password, tags, permissions}) whose state on the broker differs from the
    inventory's: missing, another password, other tags, or other permissions (the role's list is
    authoritative: a permission on a vhost not listed counts as a difference). Only these go
    through community.rabbitmq.rabbitmq_user, which then sets what differs."""
    have = {user["name"]: user for user in definitions.get("users") or []}
    permissions = {}
    for entry in definitions.get("permissions") or []:
        permissions.setdefault(entry["user"], set()).add(
            (entry["vhost"], entry["configure"], entry["write"], entry["read"]))
    differ = []
    for user in users:
        found = have.get(user["name"])
        wanted = {(p["vhost"], p["configure"], p["write"], p["read"]) for p in user_permissions(user.get("permissions"))}
        if (found is None or not _password_matches(found, user.get("password", ""))
                or sorted(_tags(found.get("tags"))) != sorted(_tags(user.get("tags")))
                or permissions.get(user["name"], set()) != wanted):
            differ.append(user)
    return differ


def user_names(definitions):
    """The names of the broker's users."""
    return [user["name"] for user in definitions.get("users") or []]


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



def rabbitmq_env(extra, inter_node_tls, optfile):
    """The variables of rabbitmq-env.conf beyond NODENAME: the user's (rabbitmq_env_extra) and, with
    Erlang distribution over TLS, the runtime flags that switch it on for the node
    (SERVER_ADDITIONAL_ERL_ARGS) and for the CLI tools (CTL_ERL_ARGS), after the user's own flags."""
    env = dict(extra or {})
    if inter_node_tls:
        flags = f"-proto_dist inet_tls -ssl_dist_optfile {optfile}"
        for key in ("SERVER_ADDITIONAL_ERL_ARGS", "CTL_ERL_ARGS"):
            env[key] = f"{env[key]} {flags}" if str(env.get(key) or "").strip() else flags
    return env


def rabbitmq_running_distribution(processes):
    """`ps -o args=` of the rabbitmq account -> how the running node's Erlang distribution talks:
    "tls" (-proto_dist inet_tls or inet6_tls), "plain", or None when no node runs. The node is the
    beam.smp process that boots rabbit (the CLI tools run beam.smp too)."""
    for line in (processes or "").splitlines():
        args = line.split()
        boots_rabbit = any(flag == "-s" and module == "rabbit" for flag, module in zip(args, args[1:]))
        if args and args[0].endswith("beam.smp") and boots_rabbit:
            proto = args[args.index("-proto_dist") + 1] if "-proto_dist" in args[:-1] else "inet_tcp"
            return "tls" if proto.endswith("_tls") else "plain"
    return None


class FilterModule:
    def filters(self):
        return {f.__name__: f for f in (
            producer_permissions, user_permissions, queue_type_changes, dead_letter_policies, dead_letter_policies_to_clear,
            policies_to_set, vhosts_to_create, users_to_set, user_names, rabbitmq_nodes, rabbitmq_env,
            rabbitmq_running_distribution, broker_limits, limits_to_set)}
