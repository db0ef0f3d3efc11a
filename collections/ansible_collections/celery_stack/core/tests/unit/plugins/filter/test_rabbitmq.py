"""Unit tests of the broker's side of the stack (plugins/filter/rabbitmq.py), run by `make test`:
the producers' permissions, the queue checks, the dead-letter policies, what differs from the
broker's definitions (users, vhosts, policies), the node names.
"""

import base64
import hashlib
import re
import sys
from pathlib import Path

import pytest

# collections/ on the import path, as Ansible's collection loader would put it.
sys.path.insert(0, str(Path(__file__).resolve().parents[7]))

from ansible_collections.celery_stack.core.plugins.filter import rabbitmq, routing  # noqa: E402
from stack_examples import TABLE  # noqa: E402


def test_producer_permissions_publish_only():
    table = routing.routing_table(TABLE, "rabbitmq", False)
    permissions = rabbitmq.producer_permissions(table)
    mailbox = r"celery\-stack\-producers\.pidbox"
    assert permissions == {"configure": f"^({mailbox})$", "write": f"^(io|cpu|{mailbox})$", "read": "^$"}
    write, configure = re.compile(permissions["write"]), re.compile(permissions["configure"])
    assert write.match("io") and write.match("cpu")
    assert not write.match("celery") and not write.match("iox") and not write.match("amq.default")
    # revoke(): the producers' own mailbox, never Celery's celery.pidbox (shutdown, pool_restart, ...)
    for allowed in (write, configure):
        assert allowed.match("celery-stack-producers.pidbox")
        assert not allowed.match("celery.pidbox") and not allowed.match("celery-stack-producersXpidbox")
    assert not configure.match("io")


def test_producer_permissions_quorum_and_rpc():
    table = routing.routing_table([{"name": "a.b"}], "rabbitmq", True)
    permissions = rabbitmq.producer_permissions(table, "rpc")
    write = re.compile(permissions["write"])
    assert write.match("a.b") and write.match("celery_delayed_27") and not write.match("aXb")
    reply = re.compile(permissions["read"])
    assert reply.match("2f1c7c3e-58a4-4a4e-9d35-0c1b6f0e9d11") and not reply.match("io")
    assert reply.match("2f1c7c3e-58a4-4a4e-9d35-0c1b6f0e9d11")
    assert re.compile(permissions["configure"]).match("2f1c7c3e-58a4-4a4e-9d35-0c1b6f0e9d11")
    assert not reply.match("celery-stack-producers.pidbox")  # a producer publishes revoke, reads no reply


def test_producer_permissions_task_sent_events():
    # task_send_sent_event: the producer declares the celeryev exchange and publishes task-sent
    table = routing.routing_table(TABLE, "rabbitmq", False)
    permissions = rabbitmq.producer_permissions(table, "redis", events=True)
    write, configure = re.compile(permissions["write"]), re.compile(permissions["configure"])
    assert write.match("celeryev") and write.match("io") and not write.match("celeryevx")
    assert configure.match("celeryev") and not configure.match("celery") and not configure.match("io")
    assert permissions["read"] == "^$"
    assert not re.compile(rabbitmq.producer_permissions(table)["write"]).match("celeryev")
    rpc = rabbitmq.producer_permissions(table, "rpc", events=True)
    assert re.compile(rpc["configure"]).match("2f1c7c3e-58a4-4a4e-9d35-0c1b6f0e9d11")
    assert not re.compile(rpc["read"]).match("celeryev")


def test_queue_type_changes():
    wanted = [{"vhost": "celery", "name": "io", "queue_type": "quorum"},
              {"vhost": "celery", "name": "cpu", "queue_type": "classic"},
              {"vhost": "celery", "name": "new", "queue_type": "quorum"}]
    definitions = {"queues": [{"vhost": "celery", "name": "io", "type": "classic"},
                              {"vhost": "celery", "name": "cpu", "type": "classic"},
                              {"vhost": "celery", "name": "other", "type": "quorum"},
                              {"vhost": "other", "name": "io", "type": "quorum"}]}
    assert rabbitmq.queue_type_changes(wanted, definitions) == [
        {"vhost": "celery", "name": "io", "queue_type": "quorum", "existing": "a classic queue",
         "wanted": "a quorum queue"}]
    assert rabbitmq.queue_type_changes(wanted, {}) == []


def test_queue_type_changes_compare_the_maximum_priority():
    # export_definitions: arguments as a mapping, the type also as x-queue-type
    definitions = {"queues": [
        {"vhost": "celery", "name": "io", "type": "classic", "arguments": {"x-queue-type": "classic"}},
        {"vhost": "celery", "name": "cpu", "arguments": {"x-queue-type": "classic", "x-max-priority": 10}},
        {"vhost": "celery", "name": "dl", "type": "classic", "arguments": {"x-max-priority": 3}}]}
    wanted = [{"vhost": "celery", "name": "io", "queue_type": "classic", "max_priority": 10},
              {"vhost": "celery", "name": "cpu", "queue_type": "classic", "max_priority": None},
              {"vhost": "celery", "name": "dl", "queue_type": "classic", "max_priority": 3}]
    changes = rabbitmq.queue_type_changes(wanted, definitions)
    assert [(c["name"], c["existing"], c["wanted"]) for c in changes] == [
        ("io", "a classic queue", "a classic queue with max_priority 10"),
        ("cpu", "a classic queue with max_priority 10", "a classic queue")]


def test_rabbitmq_nodes():
    hostvars = {"mq1": {"ansible_facts": {"hostname": "broker-a"}}, "mq2.example.org": {"celery_stack_address": "10.0.0.12"},
                "mq3": {"rabbitmq_nodename": "rabbit@custom"}}
    assert rabbitmq.rabbitmq_nodes(["mq1", "mq2.example.org", "mq3"], hostvars) == \
        ["rabbit@broker-a", "rabbit@mq2", "rabbit@custom"]


def test_dead_letter_policies_one_per_routed_queue():
    queues = [{"vhost": "celery", "name": "io", "queue_type": "classic"},
              {"vhost": "celery", "name": "cpu.heavy", "queue_type": "quorum"}]
    policies = rabbitmq.dead_letter_policies(queues, 20, 0)
    assert policies == [
        {"vhost": "celery", "name": "celery-stack-dead-letter-io", "pattern": "^io$", "priority": "0",
         "tags": {"dead-letter-exchange": "celery-stack.dead-letter", "dead-letter-routing-key": "io"}},
        {"vhost": "celery", "name": "celery-stack-dead-letter-cpu.heavy", "pattern": r"^cpu\.heavy$", "priority": "0",
         "tags": {"dead-letter-exchange": "celery-stack.dead-letter", "dead-letter-routing-key": "cpu.heavy",
                  "delivery-limit": 20}},
    ]
    # The pattern is the queue's exact name: never its dead-letter queue.
    assert not re.search(policies[0]["pattern"], "io.dead-letter")
    with pytest.raises(Exception, match="at least 1"):
        rabbitmq.dead_letter_policies(queues, 0)


def test_dead_letter_policies_carry_the_length_limits():
    queues = [{"vhost": "celery", "name": "io", "queue_type": "classic", "max_length": 100000,
               "overflow": "reject-publish-dlx"},
              {"vhost": "celery", "name": "cpu", "queue_type": "quorum", "max_length_bytes": 1048576},
              {"vhost": "celery", "name": "plain", "queue_type": "classic"}]
    io, cpu, plain = rabbitmq.dead_letter_policies(queues, 20, 0)
    assert io["tags"] == {"dead-letter-exchange": "celery-stack.dead-letter", "dead-letter-routing-key": "io",
                          "max-length": 100000, "overflow": "reject-publish-dlx"}
    # no overflow given: reject-publish; the quorum queue's delivery-limit stays
    assert cpu["tags"] == {"dead-letter-exchange": "celery-stack.dead-letter", "dead-letter-routing-key": "cpu",
                           "delivery-limit": 20, "max-length-bytes": 1048576, "overflow": "reject-publish"}
    # a queue without limits keeps exactly today's policy (no change on existing deployments)
    assert plain == rabbitmq.dead_letter_policies([{"vhost": "celery", "name": "plain", "queue_type": "classic"}])[0]
    assert set(plain["tags"]) == {"dead-letter-exchange", "dead-letter-routing-key"}
    # one policy per queue: a changed limit is a changed definition of the same policy
    exported = _exported(io)
    assert rabbitmq.policies_to_set({"policies": [exported]}, [io]) == []
    assert rabbitmq.policies_to_set({"policies": [dict(exported, definition=dict(exported["definition"],
                                                                              **{"max-length": 5}))]}, [io]) == [io]


def test_dead_letter_policies_to_clear_of_queues_no_longer_routed():
    wanted = rabbitmq.dead_letter_policies([{"vhost": "celery", "name": "io", "queue_type": "classic"}])
    definitions = {"policies": [{"vhost": "celery", "name": "celery-stack-dead-letter-io"},
                                {"vhost": "celery", "name": "celery-stack-dead-letter-retired"},
                                {"vhost": "other", "name": "celery-stack-dead-letter-io"},
                                {"vhost": "celery", "name": "ops-own"}]}
    assert rabbitmq.dead_letter_policies_to_clear(definitions, wanted) == [
        {"vhost": "celery", "name": "celery-stack-dead-letter-retired"},
        {"vhost": "other", "name": "celery-stack-dead-letter-io"}]


def _exported(policy):
    """A policy as export_definitions shows it."""
    return {"vhost": policy["vhost"], "name": policy["name"], "pattern": policy["pattern"], "apply-to": "queues",
            "definition": dict(policy["tags"]), "priority": int(policy["priority"])}


def test_policies_to_set_only_what_differs():
    wanted = rabbitmq.dead_letter_policies([{"vhost": "celery", "name": "io", "queue_type": "quorum"},
                                            {"vhost": "celery", "name": "cpu", "queue_type": "classic"},
                                            {"vhost": "celery", "name": "new", "queue_type": "classic"}])
    io, cpu, _new = wanted
    assert rabbitmq.policies_to_set({"policies": [_exported(io), _exported(cpu)]}, wanted) == [_new]
    limit_changed = dict(_exported(io), definition=dict(io["tags"], **{"delivery-limit": 5}))
    other_priority = dict(_exported(cpu), priority=7)
    assert rabbitmq.policies_to_set({"policies": [limit_changed, other_priority]}, wanted) == wanted


def test_vhosts_to_create():
    assert rabbitmq.vhosts_to_create({"vhosts": [{"name": "/"}, {"name": "celery"}]}, ["celery", "app2"]) == ["app2"]


def _hash(password, salt=b"\x01\x02\x03\x04", algorithm=hashlib.sha256):
    return base64.b64encode(salt + algorithm(salt + password.encode()).digest()).decode()


def test_user_permissions_least_privilege():
    assert rabbitmq.user_permissions([{"vhost": "celery", "write": "^io$"}]) == [
        {"vhost": "celery", "configure": "^$", "write": "^io$", "read": "^$"}]
    assert rabbitmq.user_permissions(None) == []


def test_users_to_set_only_the_users_that_differ():
    ok = {"name": "celery", "password": "right-password", "tags": [],
          "permissions": [{"vhost": "celery", "configure": ".*", "write": ".*", "read": ".*"}]}
    admin = {"name": "ops", "password": "admin-password", "tags": ["administrator"], "permissions": []}
    producer = {"name": "producer", "password": "p", "permissions": [{"vhost": "celery", "write": "^io$"}]}
    definitions = {
        "users": [{"name": "celery", "password_hash": _hash("right-password"), "tags": [],
                   "hashing_algorithm": "rabbit_password_hashing_sha256"},
                  {"name": "ops", "password_hash": _hash("admin-password", algorithm=hashlib.sha512),
                   "tags": "administrator", "hashing_algorithm": "rabbit_password_hashing_sha512"},
                  {"name": "producer", "password_hash": _hash("p"), "tags": [],
                   "hashing_algorithm": "rabbit_password_hashing_sha256"}],
        "permissions": [{"user": "celery", "vhost": "celery", "configure": ".*", "write": ".*", "read": ".*"},
                        {"user": "producer", "vhost": "celery", "configure": "^$", "write": "^io$", "read": "^$"}]}
    assert rabbitmq.users_to_set(definitions, [ok, admin, producer]) == []
    # another password, other tags, a missing user
    assert rabbitmq.users_to_set(definitions, [dict(ok, password="rotated"), dict(admin, tags=[]),
                                               dict(producer, name="new")]) == [
        dict(ok, password="rotated"), dict(admin, tags=[]), dict(producer, name="new")]
    # a permission the inventory does not list (the list is authoritative), a changed regex
    extra = dict(definitions, permissions=definitions["permissions"] + [
        {"user": "celery", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}])
    assert rabbitmq.users_to_set(extra, [ok]) == [ok]
    changed = dict(producer, permissions=[{"vhost": "celery", "write": "^(io|cpu)$"}])
    assert rabbitmq.users_to_set(definitions, [changed]) == [changed]
    # an algorithm the filter does not know: the module decides (it authenticates)
    md5 = dict(definitions, users=[dict(definitions["users"][0], hashing_algorithm="rabbit_password_hashing_md5")])
    assert rabbitmq.users_to_set(md5, [ok]) == [ok]


def test_user_names():
    assert rabbitmq.user_names({"users": [{"name": "guest"}, {"name": "celery"}]}) == ["guest", "celery"]


def test_rabbitmq_env_adds_the_inter_node_tls_flags_after_the_users_own():
    optfile = "/etc/rabbitmq/inter_node_tls.config"
    flags = f"-proto_dist inet_tls -ssl_dist_optfile {optfile}"
    assert rabbitmq.rabbitmq_env({}, False, optfile) == {}
    assert rabbitmq.rabbitmq_env({"SERVER_ADDITIONAL_ERL_ARGS": "+S 2:2"}, False, optfile) == \
        {"SERVER_ADDITIONAL_ERL_ARGS": "+S 2:2"}
    assert rabbitmq.rabbitmq_env({}, True, optfile) == {"SERVER_ADDITIONAL_ERL_ARGS": flags, "CTL_ERL_ARGS": flags}
    assert rabbitmq.rabbitmq_env({"SERVER_ADDITIONAL_ERL_ARGS": "+S 2:2", "CTL_ERL_ARGS": " ", "LOG_BASE": "/x"},
                                 True, optfile) == \
        {"SERVER_ADDITIONAL_ERL_ARGS": f"+S 2:2 {flags}", "CTL_ERL_ARGS": flags, "LOG_BASE": "/x"}


def test_rabbitmq_running_distribution_reads_the_node_not_the_cli():
    beam = "/usr/lib/erlang/erts-15.2.7/bin/beam.smp -W w -MBas ageffcbf -- -root /usr/lib/erlang -- -noinput -s rabbit boot"
    cli = "/usr/lib/erlang/erts-15.2.7/bin/beam.smp -B -- -root /usr/lib/erlang -- -noshell -s elixir start_cli"
    assert rabbitmq.rabbitmq_running_distribution("") is None
    assert rabbitmq.rabbitmq_running_distribution("error: user name does not exist") is None
    assert rabbitmq.rabbitmq_running_distribution(f"{cli} -proto_dist inet_tls\n/bin/sh x") is None
    assert rabbitmq.rabbitmq_running_distribution(f"/bin/sh /usr/lib/rabbitmq/bin/rabbitmq-server\n{beam}") == "plain"
    assert rabbitmq.rabbitmq_running_distribution(f"{cli} -proto_dist inet_tls\n{beam} -proto_dist inet_tcp") == "plain"
    assert rabbitmq.rabbitmq_running_distribution(
        f"{cli}\n{beam} -proto_dist inet_tls -ssl_dist_optfile /etc/rabbitmq/inter_node_tls.config") == "tls"
    assert rabbitmq.rabbitmq_running_distribution(f"{beam} -proto_dist inet6_tls") == "tls"


# --- limits of the stack's vhost and users ---------------------------------------------------------

LIMITS = {"vhost_max_connections": 4000, "vhost_max_queues": 2000, "app_user_max_connections": 1000,
          "app_user_max_channels": 4000, "producer_user_max_connections": 2000, "producer_user_max_channels": -7}


def test_broker_limits_of_the_stack_vhost_and_users():
    limits = rabbitmq.broker_limits(LIMITS, ["celery", "celery"], "celery", "celery-producer")
    assert limits["vhosts"] == [{"vhost": "celery", "max_connections": 4000, "max_queues": 2000}]
    assert limits["users"] == [{"user": "celery", "max_connections": 1000, "max_channels": 4000},
                               # any negative number is "no limit", -1
                               {"user": "celery-producer", "max_connections": 2000, "max_channels": -1}]
    # no producers' user in the stack: no limits for it
    assert [u["user"] for u in rabbitmq.broker_limits(LIMITS, ["celery"], "celery")["users"]] == ["celery"]


def _read(item, stdout, rc=0):
    return {"item": item, "stdout": stdout, "rc": rc}


def test_limits_to_set_only_what_differs():
    user = {"user": "celery", "max_connections": 1000, "max_channels": -1}
    vhost = {"vhost": "celery", "max_connections": 4000, "max_queues": 2000}
    assert rabbitmq.limits_to_set([_read(user, '{"max-connections": 1000}'),
                                   _read(vhost, '{"max-connections": 4000, "max-queues": 2000}')]) == []
    # -1 on the broker is no limit too
    assert rabbitmq.limits_to_set([_read(user, '{"max-connections": 1000, "max-channels": -1}')]) == []
    # missing, other value, a limit the inventory does not want, nothing read (each version's empty output)
    assert rabbitmq.limits_to_set([_read(user, '{"max-connections": 5000}')]) == [user]
    assert rabbitmq.limits_to_set([_read(user, '{"max-connections": 1000, "max-channels": 5}')]) == [user]
    for empty in ("", "{}", "[]", "not json"):
        assert rabbitmq.limits_to_set([_read(vhost, empty)]) == [vhost]
    # a failed read (a dry run before the user exists): set
    assert rabbitmq.limits_to_set([_read(user, '{"max-connections": 1000}', rc=2)]) == [user]
