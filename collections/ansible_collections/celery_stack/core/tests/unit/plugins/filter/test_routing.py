"""Unit tests of the typed routing table and what every host derives from it
(plugins/filter/routing.py), run by `make test`.

Every case here was handled by Jinja in the roles before; the expected values are written out
by hand, not computed by the code under test.
"""

import json
import sys
from pathlib import Path

import pytest

# collections/ on the import path, as Ansible's collection loader would put it.
sys.path.insert(0, str(Path(__file__).resolve().parents[7]))

from ansible_collections.celery_stack.core.plugins.filter import routing  # noqa: E402
from stack_examples import GROUPS, POOL_DEFAULTS, TABLE  # noqa: E402

# --- queue types ---------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, brokers, expected", [
    (None, ["mq1"], False),          # one broker: classic
    (None, ["mq1", "mq2"], True),    # a cluster: quorum
    ("", ["mq1", "mq2"], True),
    (False, ["mq1", "mq2"], False),  # the inventory decides
    (True, ["mq1"], True),
    ("False", ["mq1", "mq2"], False),  # a templated bool arrives as a string
    ("true", [], True),
])
def test_quorum_queues(setting, brokers, expected):
    assert routing.quorum_queues(setting, brokers) is expected


def test_routing_table_types_each_queue_quorum_or_classic():
    table = routing.routing_table(TABLE, "rabbitmq", None, ["mq1", "mq2"])
    assert table == [
        {"name": "io", "tasks": ["app.tasks.crawl*"], "queue_type": "quorum", "max_priority": None},
        # the queue's own queue_type wins over the stack's decision
        {"name": "cpu", "tasks": ["app.tasks.parse", "app.tasks.cpu_*"], "queue_type": "classic",
         "max_priority": None},
    ]
    assert [q["queue_type"] for q in routing.routing_table(TABLE, "rabbitmq", None, ["mq1"])] == ["classic", "classic"]
    assert [q["queue_type"] for q in routing.routing_table(TABLE, "redis", True, [])] == [None, None]


@pytest.mark.parametrize("max_priority, expected", [(None, None), (0, None), ("0", None), (10, 10), ("5", 5)])
def test_routing_table_max_priority_zero_or_unset_means_none(max_priority, expected):
    table = routing.routing_table([{"name": "io", "max_priority": max_priority}])
    assert table[0]["max_priority"] == expected


def test_celery_routing():
    routed = routing.celery_routing(routing.routing_table(TABLE, "rabbitmq", True))
    assert routed["task_routes"] == [["app.tasks.crawl*", "io"], ["app.tasks.parse", "cpu"],
                                     ["app.tasks.cpu_*", "cpu"]]
    assert routed["task_queues"][0] == {"name": "io", "exchange": "io", "exchange_type": "topic",
                                        "routing_key": "io", "queue_type": "quorum", "max_priority": None}
    # the default queue: the first of the table unless the stack names one
    assert routed["task_default_queue"] == routed["task_default_routing_key"] == "io"
    assert routing.celery_routing(routing.routing_table(TABLE), "cpu")["task_default_exchange"] == "cpu"
    assert routed["quorum"] is True
    prioritised = routing.celery_routing(routing.routing_table([{"name": "io", "max_priority": 10}]))
    assert prioritised["task_queues"][0]["max_priority"] == 10
    assert routing.celery_routing(routing.routing_table(TABLE, "rabbitmq", False))["quorum"] is False


RELIABILITY = {"task_acks_late": True, "worker_prefetch_multiplier": 1}


def test_celery_settings_on_quorum_queues_publish_with_confirms():
    settings = routing.celery_settings(routing.routing_table(TABLE, "rabbitmq", True), "", "rabbitmq", RELIABILITY)
    assert settings["task_default_queue"] == "io"
    assert settings["task_acks_late"] is True and settings["worker_prefetch_multiplier"] == 1
    assert settings["task_default_queue_type"] == "quorum"
    assert settings["broker_transport_options"] == {"confirm_publish": True}
    assert "quorum" not in settings  # a derived flag, not a Celery setting
    json.dumps(settings)  # written to the host as JSON


def test_celery_settings_on_classic_queues_and_on_redis():
    classic = routing.celery_settings(routing.routing_table(TABLE, "rabbitmq", False), "cpu", "rabbitmq", {})
    assert "task_default_queue_type" not in classic
    # confirms on classic queues too: a broker crash must not lose what it accepted
    assert classic["broker_transport_options"] == {"confirm_publish": True}
    assert classic["task_default_queue"] == "cpu"
    redis = routing.celery_settings(routing.routing_table(TABLE, "redis"), "", "redis", {}, 7200)
    assert redis["broker_transport_options"] == {"visibility_timeout": 7200}


def test_celery_settings_retry_the_result_store():
    table = routing.routing_table(TABLE, "rabbitmq", False)
    on_redis = routing.celery_settings(table, "", "rabbitmq", {}, result_backend="redis")
    assert on_redis["result_backend_always_retry"] is True
    assert on_redis["redis_backend_health_check_interval"] > 0 and on_redis["redis_socket_keepalive"] is True
    on_rpc = routing.celery_settings(table, "", "rabbitmq", {}, result_backend="rpc")
    assert on_rpc["result_backend_always_retry"] is True
    assert not any(name.startswith("redis_") for name in on_rpc)
    # the role's variables win over the derived values
    assert routing.celery_settings(table, "", "rabbitmq", {"result_backend_always_retry": False})[
        "result_backend_always_retry"] is False


def test_celery_settings_task_events_only_with_monitoring():
    table = routing.routing_table(TABLE, "rabbitmq", False)
    quiet = routing.celery_settings(table, "", "rabbitmq", {})
    assert "worker_send_task_events" not in quiet and "task_send_sent_event" not in quiet
    watched = routing.celery_settings(table, "", "rabbitmq", {}, monitoring=True)
    assert watched["worker_send_task_events"] is True and watched["task_send_sent_event"] is True
    # the inventory's own values still win
    assert routing.celery_settings(table, "", "rabbitmq", {"task_send_sent_event": False}, monitoring=True)[
        "task_send_sent_event"] is False


def test_visibility_timeout():
    assert routing.visibility_timeout(TABLE) == 3600           # 4 x 300 s is below one hour
    long_table = [{"name": "slow", "pools": {"prefork": {"time_limit": 5000}}}]
    assert routing.visibility_timeout(long_table) == 20000
    assert routing.visibility_timeout(long_table, "900") == 900  # the inventory decides


# --- worker instances ----------------------------------------------------------------------------

def test_worker_instances_fill_defaults_and_skip_disabled_pools():
    instances = routing.worker_instances(TABLE, "w1", GROUPS, POOL_DEFAULTS, 1)
    assert [i["instance"] for i in instances] == ["io-prefork", "io-threads", "cpu-prefork"]
    io_prefork, io_threads, cpu_prefork = instances
    assert io_prefork == {"instance": "io-prefork", "queue": "io", "pool": "prefork", "concurrency": 4,
                          "prefetch_multiplier": 1, "max_tasks_per_child": 1000, "max_memory_per_child": 0,
                          "time_limit": 1500, "soft_time_limit": 1440, "stop_timeout": 1560}
    # the threads pool never gets prefork-only options, whatever the defaults hold
    assert io_threads["concurrency"] == 32
    assert io_threads["time_limit"] == io_threads["max_tasks_per_child"] == 0
    assert (cpu_prefork["concurrency"], cpu_prefork["time_limit"], cpu_prefork["soft_time_limit"]) == (2, 300, 240)


def test_worker_instances_placement():
    table = [dict(TABLE[0]), dict(TABLE[1], hosts=["cpu_workers"])]
    assert [i["instance"] for i in routing.worker_instances(table, "w1", GROUPS, POOL_DEFAULTS)] == \
        ["io-prefork", "io-threads", "cpu-prefork"]
    assert [i["instance"] for i in routing.worker_instances(table, "w2", GROUPS, POOL_DEFAULTS)] == \
        ["io-prefork", "io-threads"]
    # a pool's hosts override the queue's; host names work like group names
    table[0] = dict(TABLE[0], pools={"threads": {"hosts": ["w2"]}})
    assert [i["instance"] for i in routing.worker_instances(table, "w1", GROUPS, POOL_DEFAULTS)] == \
        ["io-prefork", "cpu-prefork"]
    assert [i["instance"] for i in routing.worker_instances(table, "w2", GROUPS, POOL_DEFAULTS)] == \
        ["io-prefork", "io-threads"]


def test_each_worker_gets_its_own_stop_timeout():
    table = [{"name": "io", "tasks": ["a.*"], "pools": {"threads": {"stop_timeout": 90}}},
             {"name": "cpu", "tasks": ["b.*"], "pools": {"prefork": {"time_limit": 300}}}]
    timeouts = {i["instance"]: i["stop_timeout"]
                for i in routing.worker_instances(table, "w1", GROUPS, POOL_DEFAULTS, 1, 0, 60)}
    # prefork: its own time_limit + the margin; threads: its pool's stop_timeout, else the margin
    assert timeouts == {"io-prefork": 1560, "io-threads": 90, "cpu-prefork": 360, "cpu-threads": 60}
    # the inventory's one figure wins over every computed one
    assert {i["stop_timeout"] for i in routing.worker_instances(table, "w1", GROUPS, POOL_DEFAULTS, 1, 2000)} == {2000}


def test_pool_enabled_as_string():
    table = [{"name": "q", "tasks": [], "pools": {"threads": {"enabled": "false"}}}]
    assert [i["pool"] for i in routing.worker_instances(table, "w1", GROUPS, POOL_DEFAULTS)] == ["prefork"]


# --- queue length limits -------------------------------------------------------------------------

def test_routing_table_length_limits_only_where_set():
    table = routing.routing_table([{"name": "io", "max_length": 100000}, {"name": "big", "max_length_bytes": "1048576",
                                                                         "overflow": "drop-head"},
                                   {"name": "cpu", "max_length": 0, "overflow": "reject-publish"}])
    # the default overflow: reject-publish (the producer is told), not RabbitMQ's drop-head
    assert table[0]["max_length"] == 100000 and table[0]["overflow"] == "reject-publish"
    assert "max_length_bytes" not in table[0]
    assert table[1]["max_length_bytes"] == 1048576 and table[1]["overflow"] == "drop-head"
    # 0 is no limit, and an overflow without a limit is left out (the preflight refuses it)
    assert {"max_length", "max_length_bytes", "overflow"}.isdisjoint(table[2])
    # the Redis broker has no queue length limit: none in its table
    assert "max_length" not in routing.routing_table([{"name": "io", "max_length": 5}], "redis")[0]
