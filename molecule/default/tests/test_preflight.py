"""Bad input fails the run before any host is changed, with a message naming the variable.

Runs site.yml from the controller against this scenario's hosts with one wrong inventory value
each time (one case per class of mistake a new user makes), and checks that the run failed in
the preflight play (which validates the stack description and every role's input on every host),
that the message names the INVENTORY variable (celery_stack_*, not a role's internal one) and
that no provisioning play started. Valid input, such as a port given as a quoted number, is
accepted. Also: a change of the routed queues' type, which only the running broker can reveal,
stops the run in the broker play, before any worker is touched.
"""

import os
import pathlib

import pytest
import yaml
from playbook_runs import REPO, assert_refused_in_preflight, run

DEMO = "celery_stack_demo.tasks"

pytestmark = pytest.mark.skipif(
    not os.environ.get("MOLECULE_INVENTORY_FILE"), reason="needs the Molecule scenario's inventory"
)

# inventory values -> a text the failure must contain (it names the variable and the fix)
CASES = {
    "unknown pool": (
        {"celery_stack_queues": [{"name": "io", "tasks": ["x.*"], "pools": {"prefrok": {"concurrency": 2}}}]},
        "celery_stack_queues.pools.prefrok"),
    "unknown pool option": (
        {"celery_stack_queues": [{"name": "io", "tasks": ["x.*"], "pools": {"threads": {"concurency": 2}}}]},
        "celery_stack_queues.pools.threads.concurency"),
    "unknown queue key": (
        {"celery_stack_queues": [{"name": "io", "task": ["x.*"]}]},
        "celery_stack_queues.task"),
    "tasks as a string": (
        {"celery_stack_queues": [{"name": "io", "tasks": f"{DEMO}.crawl"}]},
        "celery_stack_queues[0] (io).tasks is the string"),
    "a pool option of the wrong type": (
        {"celery_stack_queues": [{"name": "io", "tasks": ["x.*"], "pools": {"threads": {"concurrency": "many"}}}]},
        "celery_stack_queues"),
    "a queue without an enabled pool": (
        {"celery_stack_queues": [{"name": "io", "tasks": ["x.*"], "pools": {"prefork": {"enabled": False},
                                                                          "threads": {"enabled": False}}}]},
        "celery_stack_queues[0] (io): no enabled pool"),
    "a pattern an earlier glob captures": (
        {"celery_stack_queues": [{"name": "io", "tasks": [f"{DEMO}.*"]}, {"name": "cpu", "tasks": [f"{DEMO}.cpu_*"]}]},
        f"celery_stack_queues[1] (cpu).tasks: '{DEMO}.cpu_*' is already captured by '{DEMO}.*'"),
    "a queue placed on no worker host": (
        {"celery_stack_queues": [{"name": "io", "tasks": ["x.*"], "hosts": ["apt_mirror"]}]},
        "celery_stack_queues[0] (io).pools.prefork: celery-stack-"),
    "an unknown broker": (
        {"celery_stack_broker": "kafka"},
        "celery_stack_broker must be one of: rabbitmq, redis, got: kafka"),
    "a mapping where the table's list belongs": (
        {"celery_stack_queues": {"io": {"tasks": ["x.*"]}}},
        "argument 'celery_stack_queues' is of type dict"),
    "an application path that does not exist": (
        {"celery_stack_app": {"source": "/srv/no/such/app", "module": "app.celery"}},
        "celery_stack_app.source '/srv/no/such/app' looks like a path"),
    "a default queue outside the table": (
        {"celery_stack_default_queue": "celery"},
        "celery_stack_default_queue 'celery' is not a queue of celery_stack_queues"),
    # time limits that must agree (celery_stack.core.limit_problems): io-prefork runs with the
    # pool default time_limit of 1500 s
    "a consumer timeout shorter than a queue's time limit": (
        {"rabbitmq_consumer_timeout": 600000},
        "rabbitmq_consumer_timeout of {broker} (600000 ms) must be longer than the time_limit of "
        "io-prefork (1500 s: celery_stack_queues (io).pools.prefork.time_limit"),
    "a stop timeout without room for the soft shutdown": (
        {"celery_worker_stop_timeout": 1505},
        "celery_worker_stop_timeout (1505 s"),
    "a Redis visibility timeout shorter than a task": (
        {"celery_stack_broker": "redis", "celery_app_redis_visibility_timeout": 600},
        "celery_app_redis_visibility_timeout (600 s) must be longer than the time_limit of io-prefork"),
    # priorities where the queue cannot carry them (celery_stack.core.priority_problems)
    "a maximum priority on a quorum queue": (
        {"celery_stack_queues": [{"name": "io", "tasks": ["x.*"], "queue_type": "quorum", "max_priority": 5}]},
        "celery_stack_queues[0] (io).max_priority: io is a quorum queue"),
    "a maximum priority on the Redis broker": (
        {"celery_stack_broker": "redis", "celery_stack_queues": [{"name": "io", "tasks": ["x.*"], "max_priority": 5}]},
        "celery_stack_queues[0] (io).max_priority: the Redis broker has fixed priority steps"),
    # role settings keep their own checks
    "an Erlang version without its epoch": ({"rabbitmq_erlang_version": "27.*"}, "rabbitmq_erlang_version"),
    "an evicting Redis with a broker user": ({"redis_maxmemory_policy": "allkeys-lru"}, "redis_maxmemory_policy"),
}

@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_before_any_host_is_changed(case):
    extra_vars, expected = CASES[case]
    # {broker}: the broker host as the scenario names it (default and ssh reuse these tests)
    import testinfra.utils.ansible_runner

    broker = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts("rabbitmq")[0]
    assert_refused_in_preflight(*run("site.yml", extra_vars), expected.replace("{broker}", broker))


@pytest.mark.parametrize("extra_vars", [
    {},
    # -e redis_port=6379 and YAML's "6379" arrive as strings: the spec converts them
    {"redis_port": "6379", "rabbitmq_amqp_port": "5672"},
    # an exact name under an earlier queue's glob is routed by name (Celery tries names first)
    {"celery_stack_queues": [{"name": "io", "tasks": [f"{DEMO}.*"]}, {"name": "cpu", "tasks": [f"{DEMO}.run_add"]}]},
], ids=["as deployed", "quoted ports", "exact name after a glob"])
def test_valid_input_passes_the_preflight(extra_vars):
    result, out = run("playbooks/preflight.yml", extra_vars)
    assert result.returncode == 0, out


def test_an_inventory_without_worker_hosts_is_refused(tmp_path):
    """Brokers and Redis but no worker host (a group renamed or left out): Redis would be
    re-bound to loopback, away from the workers. Refused, naming the group."""
    inventory = yaml.safe_load(pathlib.Path(os.environ["MOLECULE_INVENTORY_FILE"]).read_text())

    def drop_workers(node):
        if isinstance(node, dict):
            for group in ("celery_workers", "celery_cpu_workers"):
                node.pop(group, None)
            for value in node.values():
                drop_workers(value)

    drop_workers(inventory)
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "group_vars").symlink_to(REPO / "inventories" / "local" / "group_vars")
    assert_refused_in_preflight(*run("site.yml", inventory=tmp_path / "hosts.yml"),
                                 "the inventory has no host in group celery_workers")


def test_a_producer_host_without_the_producers_password_is_refused(tmp_path):
    """A host in group celery_producers needs the producers' RabbitMQ password (8+ characters):
    refused, naming the variable, and the (too short) value is not shown."""
    inventory = yaml.safe_load(pathlib.Path(os.environ["MOLECULE_INVENTORY_FILE"]).read_text())

    def groups(node):  # every group mapping of the inventory, at any depth
        if isinstance(node, dict):
            for name, value in node.items():
                if isinstance(value, dict):
                    yield name, value
                    yield from groups(value.get("children"))

    mirror_group = dict(groups(inventory))["apt_mirror"]
    mirror = next(iter(mirror_group["hosts"]))
    inventory.setdefault("all", {}).setdefault("children", {})["celery_producers"] = {"hosts": {mirror: None}}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "group_vars").symlink_to(REPO / "inventories" / "local" / "group_vars")
    result, out = run("site.yml", {"celery_stack_producer_password": "s3cr"}, inventory=tmp_path / "hosts.yml")
    assert_refused_in_preflight(result, out, "celery_producers need celery_stack_producer_password")
    assert "s3cr" not in out


def test_queue_type_change_stops_the_run_before_the_workers():
    """One broker: the routed queues exist as classic queues. Asking for quorum queues must stop
    the broker play, naming the queue and the setting, before users or workers are touched."""
    result, out = run("site.yml", {"celery_stack_quorum_queues": True})
    assert result.returncode != 0, out
    assert "exists as a classic queue" in out and "celery_stack_quorum_queues" in out, out
    assert "PLAY [Provision the Celery workers]" not in out
    assert "Create the users and set their passwords" not in out
