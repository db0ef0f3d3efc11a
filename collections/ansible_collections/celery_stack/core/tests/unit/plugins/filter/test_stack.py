"""Unit tests of the stack's derived decisions (plugins/filter/stack.py), run by `make test`.

Every case here was handled by Jinja in the roles before; the expected values are written out
by hand, not computed by the code under test.
"""

import json
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

# collections/ on the import path, as Ansible's collection loader would put it.
sys.path.insert(0, str(Path(__file__).resolve().parents[7]))

from ansible_collections.celery_stack.core.plugins.filter import stack  # noqa: E402

GROUPS = {
    "all": ["mq1", "mq2", "redis1", "w1", "w2"],
    "rabbitmq": ["mq1", "mq2"],
    "redis": ["redis1"],
    "celery_workers": ["w1", "w2"],
    "cpu_workers": ["w1"],
}
POOL_DEFAULTS = {
    "prefork": {"concurrency": 4, "max_tasks_per_child": 1000, "max_memory_per_child": 0,
                "time_limit": 1500, "soft_time_limit": 1440},
    "threads": {"concurrency": 8},
}
TABLE = [
    {"name": "io", "tasks": ["app.tasks.crawl*"], "pools": {"threads": {"concurrency": 32}}},
    {"name": "cpu", "tasks": ["app.tasks.parse", "app.tasks.cpu_*"], "queue_type": "classic",
     "pools": {"prefork": {"concurrency": 2, "time_limit": 300, "soft_time_limit": 240},
               "threads": {"enabled": False}}},
]


# --- queue types -------------------------------------------------------------------------------

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
    assert stack.quorum_queues(setting, brokers) is expected


def test_routing_table_types_each_queue_quorum_or_classic():
    table = stack.routing_table(TABLE, "rabbitmq", None, ["mq1", "mq2"])
    assert table == [
        {"name": "io", "tasks": ["app.tasks.crawl*"], "queue_type": "quorum", "max_priority": None},
        # the queue's own queue_type wins over the stack's decision
        {"name": "cpu", "tasks": ["app.tasks.parse", "app.tasks.cpu_*"], "queue_type": "classic",
         "max_priority": None},
    ]
    assert [q["queue_type"] for q in stack.routing_table(TABLE, "rabbitmq", None, ["mq1"])] == ["classic", "classic"]
    assert [q["queue_type"] for q in stack.routing_table(TABLE, "redis", True, [])] == [None, None]


def test_celery_routing():
    routing = stack.celery_routing(stack.routing_table(TABLE, "rabbitmq", True))
    assert routing["task_routes"] == [["app.tasks.crawl*", "io"], ["app.tasks.parse", "cpu"],
                                      ["app.tasks.cpu_*", "cpu"]]
    assert routing["task_queues"][0] == {"name": "io", "exchange": "io", "exchange_type": "topic",
                                         "routing_key": "io", "queue_type": "quorum", "max_priority": None}
    # the default queue: the first of the table unless the stack names one
    assert routing["task_default_queue"] == routing["task_default_routing_key"] == "io"
    assert stack.celery_routing(stack.routing_table(TABLE), "cpu")["task_default_exchange"] == "cpu"
    assert routing["quorum"] is True
    assert stack.celery_routing(stack.routing_table(TABLE, "rabbitmq", False))["quorum"] is False


RELIABILITY = {"task_acks_late": True, "worker_prefetch_multiplier": 1}


def test_celery_settings_on_quorum_queues_publish_with_confirms():
    settings = stack.celery_settings(stack.routing_table(TABLE, "rabbitmq", True), "", "rabbitmq", RELIABILITY)
    assert settings["task_default_queue"] == "io"
    assert settings["task_acks_late"] is True and settings["worker_prefetch_multiplier"] == 1
    assert settings["task_default_queue_type"] == "quorum"
    assert settings["broker_transport_options"] == {"confirm_publish": True}
    assert "quorum" not in settings  # a derived flag, not a Celery setting
    json.dumps(settings)  # written to the host as JSON


def test_celery_settings_on_classic_queues_and_on_redis():
    classic = stack.celery_settings(stack.routing_table(TABLE, "rabbitmq", False), "cpu", "rabbitmq", {})
    assert "task_default_queue_type" not in classic
    # confirms on classic queues too: a broker crash must not lose what it accepted
    assert classic["broker_transport_options"] == {"confirm_publish": True}
    assert classic["task_default_queue"] == "cpu"
    redis = stack.celery_settings(stack.routing_table(TABLE, "redis"), "", "redis", {}, 7200)
    assert redis["broker_transport_options"] == {"visibility_timeout": 7200}


def test_celery_settings_retry_the_result_store():
    table = stack.routing_table(TABLE, "rabbitmq", False)
    on_redis = stack.celery_settings(table, "", "rabbitmq", {}, result_backend="redis")
    assert on_redis["result_backend_always_retry"] is True
    assert on_redis["redis_backend_health_check_interval"] > 0 and on_redis["redis_socket_keepalive"] is True
    on_rpc = stack.celery_settings(table, "", "rabbitmq", {}, result_backend="rpc")
    assert on_rpc["result_backend_always_retry"] is True
    assert not any(name.startswith("redis_") for name in on_rpc)
    # the role's variables win over the derived values
    assert stack.celery_settings(table, "", "rabbitmq", {"result_backend_always_retry": False})[
        "result_backend_always_retry"] is False


def test_celery_settings_task_events_only_with_monitoring():
    table = stack.routing_table(TABLE, "rabbitmq", False)
    quiet = stack.celery_settings(table, "", "rabbitmq", {})
    assert "worker_send_task_events" not in quiet and "task_send_sent_event" not in quiet
    watched = stack.celery_settings(table, "", "rabbitmq", {}, monitoring=True)
    assert watched["worker_send_task_events"] is True and watched["task_send_sent_event"] is True
    # the inventory's own values still win
    assert stack.celery_settings(table, "", "rabbitmq", {"task_send_sent_event": False}, monitoring=True)[
        "task_send_sent_event"] is False


def test_visibility_timeout():
    assert stack.visibility_timeout(TABLE) == 3600           # 4 x 300 s is below one hour
    long_table = [{"name": "slow", "pools": {"prefork": {"time_limit": 5000}}}]
    assert stack.visibility_timeout(long_table) == 20000
    assert stack.visibility_timeout(long_table, "900") == 900  # the inventory decides


def test_producer_permissions_publish_only():
    table = stack.routing_table(TABLE, "rabbitmq", False)
    permissions = stack.producer_permissions(table)
    # and the producers' own mailbox exchange (revoke), never the workers' celery.pidbox
    mailbox = re.escape(f"{stack.PRODUCER_CONTROL_EXCHANGE}.pidbox")
    assert permissions == {"configure": f"^({mailbox})$", "write": f"^(io|cpu|{mailbox})$", "read": "^$"}
    write = re.compile(permissions["write"])
    assert write.match("io") and write.match("cpu")
    assert not write.match("celery") and not write.match("iox") and not write.match("amq.default")
    assert not write.match("celery.pidbox")


def test_producer_permissions_quorum_and_rpc():
    table = stack.routing_table([{"name": "a.b"}], "rabbitmq", True)
    permissions = stack.producer_permissions(table, "rpc")
    write = re.compile(permissions["write"])
    assert write.match("a.b") and write.match("celery_delayed_27") and not write.match("aXb")
    reply = re.compile(permissions["read"])
    assert reply.match("2f1c7c3e-58a4-4a4e-9d35-0c1b6f0e9d11") and not reply.match("io")
    configure = re.compile(permissions["configure"])
    assert configure.match("2f1c7c3e-58a4-4a4e-9d35-0c1b6f0e9d11") and not configure.match("io")
    assert configure.match(f"{stack.PRODUCER_CONTROL_EXCHANGE}.pidbox")
    assert not reply.match(f"{stack.PRODUCER_CONTROL_EXCHANGE}.pidbox")


def test_producer_permissions_task_sent_events():
    # task_send_sent_event: the producer declares the celeryev exchange and publishes task-sent
    table = stack.routing_table(TABLE, "rabbitmq", False)
    permissions = stack.producer_permissions(table, "redis", events=True)
    write, configure = re.compile(permissions["write"]), re.compile(permissions["configure"])
    assert write.match("celeryev") and write.match("io") and not write.match("celeryevx")
    assert configure.match("celeryev") and not configure.match("celery") and not configure.match("io")
    assert permissions["read"] == "^$"
    assert not re.compile(stack.producer_permissions(table)["write"]).match("celeryev")
    rpc = stack.producer_permissions(table, "rpc", events=True)
    assert re.compile(rpc["configure"]).match("2f1c7c3e-58a4-4a4e-9d35-0c1b6f0e9d11")
    assert not re.compile(rpc["read"]).match("celeryev")


def test_queue_type_changes():
    wanted = [{"vhost": "celery", "name": "io", "queue_type": "quorum"},
              {"vhost": "celery", "name": "cpu", "queue_type": "classic"},
              {"vhost": "celery", "name": "new", "queue_type": "quorum"}]
    listings = [{"item": "celery", "stdout": json.dumps([{"name": "io", "type": "classic"},
                                                         {"name": "cpu", "type": "classic"},
                                                         {"name": "other", "type": "quorum"}])}]
    assert stack.queue_type_changes(wanted, listings) == [
        {"vhost": "celery", "name": "io", "queue_type": "quorum", "existing": "classic", "wanted": "quorum"}]
    assert stack.queue_type_changes(wanted, [{"item": "celery", "stdout": ""}]) == []


# --- worker instances ----------------------------------------------------------------------------

def test_worker_instances_fill_defaults_and_skip_disabled_pools():
    instances = stack.worker_instances(TABLE, "w1", GROUPS, POOL_DEFAULTS, 1)
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
    assert [i["instance"] for i in stack.worker_instances(table, "w1", GROUPS, POOL_DEFAULTS)] == \
        ["io-prefork", "io-threads", "cpu-prefork"]
    assert [i["instance"] for i in stack.worker_instances(table, "w2", GROUPS, POOL_DEFAULTS)] == \
        ["io-prefork", "io-threads"]
    # a pool's hosts override the queue's; host names work like group names
    table[0] = dict(TABLE[0], pools={"threads": {"hosts": ["w2"]}})
    assert [i["instance"] for i in stack.worker_instances(table, "w1", GROUPS, POOL_DEFAULTS)] == \
        ["io-prefork", "cpu-prefork"]
    assert [i["instance"] for i in stack.worker_instances(table, "w2", GROUPS, POOL_DEFAULTS)] == \
        ["io-prefork", "io-threads"]


LIMITED = [{"instance": "cpu-prefork", "queue": "cpu", "pool": "prefork", "time_limit": 300, "stop_timeout": 360},
           {"instance": "cpu-threads", "queue": "cpu", "pool": "threads", "time_limit": 0, "stop_timeout": 60}]


def test_limits_that_agree():
    assert stack.limit_problems(LIMITED, 360, 10.0, {"mq1": 1800000, "mq2": None}, 0) == []
    assert stack.limit_problems(LIMITED[1:], 60, 10.0, {"mq1": 1000}) == []  # threads: no limit to check


def test_a_consumer_timeout_shorter_than_a_time_limit_names_both():
    found = stack.limit_problems(LIMITED, 360, 10.0, {"mq1": 300000, "mq2": 1800000})
    assert len(found) == 1
    assert found[0].startswith("rabbitmq_consumer_timeout of mq1 (300000 ms) must be longer than "
                               "the time_limit of cpu-prefork (300 s: celery_stack_queues (cpu).pools.prefork.time_limit")


def test_a_stop_timeout_without_room_for_the_soft_shutdown():
    overridden = [dict(i, stop_timeout=305) for i in LIMITED]
    found = stack.limit_problems(overridden, 305, 10.0, {})
    assert len(found) == 1 and found[0].startswith("celery_worker_stop_timeout (305 s")
    assert "celery_app_soft_shutdown_timeout (10 s)" in found[0]
    found = stack.limit_problems([dict(LIMITED[0], stop_timeout=300)], 0, 10.0, {})
    assert len(found) == 1 and found[0].startswith("celery_stack_queues (cpu).pools.prefork.stop_timeout (300 s")


def test_each_worker_gets_its_own_stop_timeout():
    table = [{"name": "io", "tasks": ["a.*"], "pools": {"threads": {"stop_timeout": 90}}},
             {"name": "cpu", "tasks": ["b.*"], "pools": {"prefork": {"time_limit": 300}}}]
    timeouts = {i["instance"]: i["stop_timeout"]
                for i in stack.worker_instances(table, "w1", GROUPS, POOL_DEFAULTS, 1, 0, 60)}
    # prefork: its own time_limit + the margin; threads: its pool's stop_timeout, else the margin
    assert timeouts == {"io-prefork": 1560, "io-threads": 90, "cpu-prefork": 360, "cpu-threads": 60}
    # the inventory's one figure wins over every computed one
    assert {i["stop_timeout"] for i in stack.worker_instances(table, "w1", GROUPS, POOL_DEFAULTS, 1, 2000)} == {2000}


def test_a_redis_visibility_timeout_shorter_than_a_task():
    found = stack.limit_problems(LIMITED, 360, 10.0, {}, 300)
    assert len(found) == 1 and found[0].startswith("celery_app_redis_visibility_timeout (300 s)")


def test_pool_enabled_as_string():
    table = [{"name": "q", "tasks": [], "pools": {"threads": {"enabled": "false"}}}]
    assert [i["pool"] for i in stack.worker_instances(table, "w1", GROUPS, POOL_DEFAULTS)] == ["prefork"]


# --- URLs ----------------------------------------------------------------------------------------

def test_broker_url_percent_encodes_credentials_and_vhost():
    url = stack.broker_url(["mq1", "mq2"], "rabbitmq", "app@corp", "p@ss:w/rd#%", "celery/prod")
    assert url == ("amqp://app%40corp:p%40ss%3Aw%2Frd%23%25@mq1:5672/celery%2Fprod;"
                   "amqp://app%40corp:p%40ss%3Aw%2Frd%23%25@mq2:5672/celery%2Fprod")
    first = urlsplit(url.split(";")[0])
    assert (unquote(first.username), unquote(first.password)) == ("app@corp", "p@ss:w/rd#%")
    assert stack.broker_url(["mq1"], "rabbitmq", "u", "p", "/") == "amqp://u:p@mq1:5672/%2F"
    assert stack.broker_url(["r1"], "redis", "u", "p", db=2) == "redis://u:p@r1:6379/2"
    assert stack.broker_url(["mq1"], "rabbitmq", "u", "p", "v", port="5673") == "amqp://u:p@mq1:5673/v"


def test_redis_url():
    assert stack.redis_url("10.0.0.2", "6380", 0, "celery-results", "p@ss:w/rd#%") == \
        "redis://celery-results:p%40ss%3Aw%2Frd%23%25@10.0.0.2:6380/0"


# --- hosts ---------------------------------------------------------------------------------------

def test_addresses_and_nodes():
    hostvars = {"mq1": {"ansible_facts": {"hostname": "broker-a"}}, "mq2.example.org": {"celery_stack_address": "10.0.0.12"},
                "mq3": {"rabbitmq_nodename": "rabbit@custom"}}
    assert stack.addresses(["mq1", "mq2.example.org"], "mq1", hostvars) == ["127.0.0.1", "10.0.0.12"]
    assert stack.addresses(["mq1"], "w1", hostvars) == ["mq1"]
    assert stack.rabbitmq_nodes(["mq1", "mq2.example.org", "mq3"], hostvars) == \
        ["rabbit@broker-a", "rabbit@mq2", "rabbit@custom"]


def test_spread_gives_each_client_its_first_broker():
    brokers, clients = ["mq1", "mq2", "mq3"], ["w1", "w2", "web1", "web2"]
    firsts = [stack.spread(brokers, client, clients)[0] for client in clients]
    assert firsts == ["mq1", "mq2", "mq3", "mq1"]  # round-robin over the clients
    assert sorted(stack.spread(brokers, "w2", clients)) == brokers  # every broker stays, to fail over
    assert stack.spread(brokers, "mq3", clients + ["mq3"]) == ["mq3", "mq1", "mq2"]  # on a broker: itself
    assert stack.spread(brokers, "elsewhere", clients) == brokers
    assert stack.spread([], "w1", clients) == []


def test_host_values():
    hostvars = {"mq1": {"rabbitmq__consumer_timeout": 5}, "mq2": {}}
    assert stack.host_values(["mq1", "mq2"], hostvars, "rabbitmq__consumer_timeout") == {"mq1": 5, "mq2": None}


def test_redis_broker_keys():
    assert stack.redis_broker_keys(["io", "celery"]) == ["io", "io??[369]", "celery", "celery??[369]"]


# --- the rules across fields ---------------------------------------------------------------------

def _problems(queues, groups=GROUPS, default_queue="", app=None):
    return stack.problems(queues, groups, default_queue, app)


def test_a_valid_table_has_no_problem(tmp_path):
    assert _problems(TABLE, app={"source": str(tmp_path), "module": "x"}) == []
    assert _problems(TABLE, app={"source": "acme==1.0", "module": "x"}) == []


def test_tasks_given_as_a_string():
    [problem] = _problems([{"name": "io", "tasks": "app.tasks.crawl"}])
    assert "celery_stack_queues[0] (io).tasks is the string" in problem


def test_a_queue_without_an_enabled_pool():
    [problem] = _problems([{"name": "io", "tasks": ["a.*"],
                            "pools": {"prefork": {"enabled": False}, "threads": {"enabled": False}}}])
    assert "celery_stack_queues[0] (io)" in problem and "no enabled pool" in problem


def test_a_queue_placed_on_no_worker_host():
    problems = _problems([{"name": "io", "tasks": ["a.*"], "hosts": ["mq1"]}])
    assert any("mq1 not in group celery_workers" in p for p in problems)
    problems = _problems([{"name": "io", "tasks": ["a.*"], "hosts": ["nosuchhost"]}])
    assert any("celery_stack_queues[0].hosts: 'nosuchhost' is neither a host nor a group" in p for p in problems)


@pytest.mark.parametrize("earlier, later, captured", [
    ("app.tasks.*", "app.tasks.parse_*", True),
    ("app.*", "app.tasks.x*", True),
    ("app.tasks.crawl*", "app.tasks.crawl*", True),
    ("app.tasks.crawl*", "app.tasks.c*", False),   # overlaps, but the later one still gets app.tasks.cx
    ("app.tasks.crawl*", "app.tasks.parse*", False),
    ("app.tasks.*", "app.tasks.parse", False),     # an exact name wins over every glob
])
def test_a_pattern_captured_by_an_earlier_glob(earlier, later, captured):
    table = [{"name": "first", "tasks": [earlier]}, {"name": "second", "tasks": [later]}]
    problems = _problems(table)
    assert bool(problems) is captured, problems
    if captured:
        assert f"celery_stack_queues[1] (second).tasks: {later!r} is already captured by {earlier!r}" in problems[0]


def test_an_exact_name_in_two_queues():
    problems = _problems([{"name": "a", "tasks": ["x.y"]}, {"name": "b", "tasks": ["x.y"]}])
    assert problems == ["celery_stack_queues[1] (b).tasks: 'x.y' is routed to queue a already"]


def test_prefork_only_options_on_threads_and_limits():
    problems = _problems([{"name": "io", "tasks": [], "pools": {
        "threads": {"time_limit": 10},
        "prefork": {"concurrency": 0, "time_limit": 10, "soft_time_limit": 20}}}])
    assert any("pools.threads: the threads pool cannot enforce time_limit" in p for p in problems)
    assert any("pools.prefork.concurrency must be at least 1" in p for p in problems)
    assert any("soft_time_limit (20) must be below time_limit (10)" in p for p in problems)


def test_names_default_queue_and_no_workers():
    problems = _problems([{"name": "bad name", "tasks": []}, {"name": "bad name", "tasks": []}], default_queue="nope")
    assert any("celery_stack_queues[0].name 'bad name'" in p for p in problems)
    assert any("the queue name appears twice" in p for p in problems)
    assert any(p.startswith("celery_stack_default_queue 'nope'") for p in problems)
    problems = _problems(TABLE, groups={**GROUPS, "celery_workers": []})
    assert any("no host in group celery_workers" in p for p in problems)
    assert _problems([]) and "lists no queue" in _problems([])[0]


def test_application_source(tmp_path):
    wheel = tmp_path / "app-1.0-py3-none-any.whl"
    wheel.write_text("")
    assert stack.app_kind(str(tmp_path)) == "directory"
    assert stack.app_kind(str(wheel)) == "file"
    assert stack.app_kind("acme[redis]==2.4.1") == "requirement"
    assert stack.app_kind("git+https://example.org/acme.git") == "requirement"
    for missing in (str(tmp_path / "nope"), "./app", "../app", "dist/app-1.0.tar.gz"):
        [problem] = _problems(TABLE, app={"source": missing, "module": "x"})
        assert problem.startswith(f"celery_stack_app.source {missing!r} looks like a path"), problem
    [problem] = _problems(TABLE, app={"source": str(tmp_path / "gone"), "kind": "directory", "module": "x"})
    assert "no such directory" in problem


def test_dead_letter_policies_one_per_routed_queue():
    queues = [{"vhost": "celery", "name": "io", "queue_type": "classic"},
              {"vhost": "celery", "name": "cpu.heavy", "queue_type": "quorum"}]
    policies = stack.dead_letter_policies(queues, 20, 0)
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
        stack.dead_letter_policies(queues, 0)


def test_stale_dead_letter_policies():
    wanted = stack.dead_letter_policies([{"vhost": "celery", "name": "io", "queue_type": "classic"}])
    listing = [{"item": "celery", "stdout": json.dumps([
        {"name": "celery-stack-dead-letter-io"}, {"name": "celery-stack-dead-letter-retired"}, {"name": "ops-own"}])}]
    assert stack.stale_dead_letter_policies(listing, wanted) == [
        {"vhost": "celery", "name": "celery-stack-dead-letter-retired"}]
