"""Unit tests of the stack description's rules across fields (plugins/filter/stack_rules.py), run
by `make test`. The messages are the ones the preflight shows: the tests compare their text.
"""

import sys
from pathlib import Path

import pytest

# collections/ on the import path, as Ansible's collection loader would put it.
sys.path.insert(0, str(Path(__file__).resolve().parents[7]))

from ansible_collections.celery_stack.core.plugins.filter import routing, stack_rules  # noqa: E402
from stack_examples import GROUPS, TABLE  # noqa: E402

# --- priorities ----------------------------------------------------------------------------------

def test_priority_problems_name_the_queue_and_the_reason():
    classic = routing.routing_table([{"name": "io", "max_priority": 10}, {"name": "cpu"}], "rabbitmq", False)
    assert stack_rules.priority_problems(classic) == []
    assert stack_rules.priority_problems(routing.routing_table([{"name": "io", "max_priority": 256}])) == [
        "celery_stack_queues[0] (io).max_priority must be between 1 and 255, got 256"]
    quorum = stack_rules.priority_problems(routing.routing_table([{"name": "cpu"}, {"name": "io", "max_priority": 5}],
                                                               "rabbitmq", True, ["mq1", "mq2", "mq3"]))
    assert len(quorum) == 1 and quorum[0].startswith("celery_stack_queues[1] (io).max_priority: io is a quorum")
    # a classic queue of its own in a quorum stack may carry priorities
    assert stack_rules.priority_problems(routing.routing_table(
        [{"name": "io", "max_priority": 5, "queue_type": "classic"}], "rabbitmq", True, ["mq1", "mq2"])) == []
    redis = stack_rules.priority_problems(routing.routing_table([{"name": "io", "max_priority": 5}], "redis"), "redis")
    assert len(redis) == 1 and "Redis broker has fixed priority steps" in redis[0]


def test_problems_include_the_priority_rules():
    queues = [{"name": "io", "tasks": ["app.io"], "max_priority": 300}]
    assert any("max_priority must be between 1 and 255" in m for m in stack_rules.problems(queues, GROUPS))
    assert stack_rules.problems([{"name": "io", "tasks": ["app.io"], "max_priority": 3}], GROUPS, broker="redis") != []


# --- the time limits of a worker host ------------------------------------------------------------

LIMITED = [{"instance": "cpu-prefork", "queue": "cpu", "pool": "prefork", "time_limit": 300, "stop_timeout": 360},
           {"instance": "cpu-threads", "queue": "cpu", "pool": "threads", "time_limit": 0, "stop_timeout": 60}]


def test_limits_that_agree():
    assert stack_rules.limit_problems(LIMITED, 360, 10.0, {"mq1": 1800000, "mq2": None}, 0) == []
    assert stack_rules.limit_problems(LIMITED[1:], 60, 10.0, {"mq1": 1000}) == []  # threads: no limit to check


def test_a_consumer_timeout_shorter_than_a_time_limit_names_both():
    found = stack_rules.limit_problems(LIMITED, 360, 10.0, {"mq1": 300000, "mq2": 1800000})
    assert len(found) == 1
    assert found[0].startswith("rabbitmq_consumer_timeout of mq1 (300000 ms) must be longer than "
                               "the time_limit of cpu-prefork (300 s: celery_stack_queues (cpu).pools.prefork.time_limit")


def test_a_stop_timeout_without_room_for_the_soft_shutdown():
    overridden = [dict(i, stop_timeout=305) for i in LIMITED]
    found = stack_rules.limit_problems(overridden, 305, 10.0, {})
    assert len(found) == 1 and found[0].startswith("celery_worker_stop_timeout (305 s")
    assert "celery_app_soft_shutdown_timeout (10 s)" in found[0]
    found = stack_rules.limit_problems([dict(LIMITED[0], stop_timeout=300)], 0, 10.0, {})
    assert len(found) == 1 and found[0].startswith("celery_stack_queues (cpu).pools.prefork.stop_timeout (300 s")


def test_a_redis_visibility_timeout_shorter_than_a_task():
    found = stack_rules.limit_problems(LIMITED, 360, 10.0, {}, 300)
    assert len(found) == 1 and found[0].startswith("celery_app_redis_visibility_timeout (300 s)")


# --- the rules across fields ---------------------------------------------------------------------

def _problems(queues, groups=GROUPS, default_queue="", app=None):
    return stack_rules.problems(queues, groups, default_queue, app)


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
    assert stack_rules.app_kind(str(tmp_path)) == "directory"
    assert stack_rules.app_kind(str(wheel)) == "file"
    assert stack_rules.app_kind("acme[redis]==2.4.1") == "requirement"
    assert stack_rules.app_kind("git+https://example.org/acme.git") == "requirement"
    for missing in (str(tmp_path / "nope"), "./app", "../app", "dist/app-1.0.tar.gz"):
        [problem] = _problems(TABLE, app={"source": missing, "module": "x"})
        assert problem.startswith(f"celery_stack_app.source {missing!r} looks like a path"), problem
    [problem] = _problems(TABLE, app={"source": str(tmp_path / "gone"), "kind": "directory", "module": "x"})
    assert "no such directory" in problem


# --- queue length limits -------------------------------------------------------------------------

def _lengths(queues, broker="rabbitmq", quorum=False):
    return stack_rules.length_problems(queues, routing.routing_table(queues, "rabbitmq", quorum, ["mq1", "mq2"]),
                                       broker)


def test_length_problems_accept_what_the_queue_type_takes():
    assert _lengths([{"name": "io", "max_length": 100000}, {"name": "cpu"}]) == []
    for overflow in ("drop-head", "reject-publish", "reject-publish-dlx"):
        assert _lengths([{"name": "io", "max_length": 10, "overflow": overflow}]) == []
    for overflow in ("drop-head", "reject-publish", None):
        assert _lengths([{"name": "io", "max_length_bytes": 10, "overflow": overflow}], quorum=True) == []
    # 0: no limit
    assert _lengths([{"name": "io", "max_length": 0}]) == []


def test_length_problems_name_the_variable():
    quorum = _lengths([{"name": "cpu"}, {"name": "io", "max_length": 10, "overflow": "reject-publish-dlx"}],
                      quorum=True)
    assert len(quorum) == 1 and quorum[0].startswith(
        "celery_stack_queues[1] (io).overflow 'reject-publish-dlx': io is a quorum queue"), quorum
    # a classic queue of its own in a quorum stack takes it
    assert _lengths([{"name": "io", "max_length": 10, "overflow": "reject-publish-dlx", "queue_type": "classic"}],
                    quorum=True) == []
    assert _lengths([{"name": "io", "overflow": "drop-head"}]) == [
        "celery_stack_queues[0] (io).overflow 'drop-head' does nothing without a limit: set max_length (or "
        "max_length_bytes), or leave overflow out"]
    assert _lengths([{"name": "io", "max_length": -1}]) == [
        "celery_stack_queues[0] (io).max_length must be 1 or more (0: no limit), got -1"]
    redis = _lengths([{"name": "io", "max_length": 10}], broker="redis")
    assert len(redis) == 1 and "Redis broker has no queue length limit" in redis[0]


def test_problems_include_the_length_rules():
    table = [dict(TABLE[0], max_length=10, overflow="reject-publish-dlx"), TABLE[1]]
    found = stack_rules.problems(table, GROUPS)  # two brokers: quorum queues
    assert any(".overflow 'reject-publish-dlx': io is a quorum queue" in p for p in found), found


# --- what the workers hold on the broker ---------------------------------------------------------

PER = stack_rules.BROKER_USE_PER_INSTANCE
EXTRA = stack_rules.BROKER_USE_PER_EXTRA


def test_broker_use_counts_every_instance_on_every_worker_host():
    # io: threads (and prefork, on by default) on w1 and w2; cpu: prefork only, on w1 and w2: 6 instances
    use = stack_rules.broker_use(TABLE, GROUPS, {}, 1, False)
    assert use["instances"] == 6
    assert use["connections"] == 6 * PER["connections"] + EXTRA["connections"]
    assert use["channels"] == 6 * PER["channels"] + EXTRA["channels"]
    assert use["queues"] == 2 * 2 + 3 * 6 + 1
    # pool defaults that switch prefork off (the table's cpu prefork does not switch it on again): the
    # io threads workers only; quorum queues add Celery's delayed-delivery queues
    off = stack_rules.broker_use(TABLE, GROUPS, {"prefork": {"enabled": False}}, 0, True)
    assert off["instances"] == 2 and off["queues"] == 2 * 2 + 3 * 2 + stack_rules.DELAYED_DELIVERY_QUEUES
    placed = [dict(TABLE[0], hosts=["cpu_workers"]), TABLE[1]]
    assert stack_rules.broker_use(placed, GROUPS, {}, 0)["instances"] == 4


def test_broker_use_problems_refuse_a_limit_below_the_workers_need():
    use = stack_rules.broker_use(TABLE, GROUPS, {}, 1, False)
    roomy = {"rabbitmq_app_user_max_connections": 1000, "rabbitmq_app_user_max_channels": -1,
             "rabbitmq_vhost_max_connections": use["connections"], "rabbitmq_vhost_max_queues": 2000}
    assert stack_rules.broker_use_problems(use, {"mq1": roomy, "mq2": None}) == []
    tight = dict(roomy, rabbitmq_app_user_max_connections=use["connections"] - 1, rabbitmq_vhost_max_queues=3)
    found = stack_rules.broker_use_problems(use, {"mq1": tight})
    assert len(found) == 2, found
    assert found[0].startswith(f"rabbitmq_app_user_max_connections of mq1 ({use['connections'] - 1}) is below the "
                               f"{use['connections']} connections that the routing table's 6 worker instances")
    assert f"to at least {use['connections']}" in found[0]
    assert found[1].startswith(f"rabbitmq_vhost_max_queues of mq1 (3) is below the {use['queues']} queues"), found
