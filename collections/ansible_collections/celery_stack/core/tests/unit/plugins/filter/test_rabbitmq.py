"""Unit tests of the broker's side of the stack (plugins/filter/rabbitmq.py), run by `make test`:
the producers' permissions, the queue checks, the dead-letter policies, the node names.
"""

import json
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
    listings = [{"item": "celery", "stdout": json.dumps([{"name": "io", "type": "classic"},
                                                         {"name": "cpu", "type": "classic"},
                                                         {"name": "other", "type": "quorum"}])}]
    assert rabbitmq.queue_type_changes(wanted, listings) == [
        {"vhost": "celery", "name": "io", "queue_type": "quorum", "existing": "a classic queue",
         "wanted": "a quorum queue"}]
    assert rabbitmq.queue_type_changes(wanted, [{"item": "celery", "stdout": ""}]) == []


def test_queue_type_changes_compare_the_maximum_priority():
    # rabbitmqctl's JSON lists a queue's arguments as [name, type, value] triples
    listings = [{"item": "celery", "stdout": json.dumps([
        {"name": "io", "type": "classic", "arguments": []},
        {"name": "cpu", "type": "classic", "arguments": [["x-max-priority", "signedint", 10]]},
        {"name": "dl", "type": "classic", "arguments": [["x-max-priority", "signedint", 3]]}])}]
    wanted = [{"vhost": "celery", "name": "io", "queue_type": "classic", "max_priority": 10},
              {"vhost": "celery", "name": "cpu", "queue_type": "classic", "max_priority": None},
              {"vhost": "celery", "name": "dl", "queue_type": "classic", "max_priority": 3}]
    changes = rabbitmq.queue_type_changes(wanted, listings)
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


def test_stale_dead_letter_policies():
    wanted = rabbitmq.dead_letter_policies([{"vhost": "celery", "name": "io", "queue_type": "classic"}])
    listing = [{"item": "celery", "stdout": json.dumps([
        {"name": "celery-stack-dead-letter-io"}, {"name": "celery-stack-dead-letter-retired"}, {"name": "ops-own"}])}]
    assert rabbitmq.stale_dead_letter_policies(listing, wanted) == [
        {"vhost": "celery", "name": "celery-stack-dead-letter-retired"}]
