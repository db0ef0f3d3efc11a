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
from concurrent.futures import ThreadPoolExecutor

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
        "celery_stack_queues must be a list of queues (- name: io ...), got a mapping"),
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
    # queue length limits the queue type refuses (celery_stack.core.length_problems)
    "an overflow a quorum queue refuses": (
        {"celery_stack_queues": [{"name": "io", "tasks": ["x.*"], "queue_type": "quorum", "max_length": 10,
                                  "overflow": "reject-publish-dlx"}]},
        "celery_stack_queues[0] (io).overflow 'reject-publish-dlx': io is a quorum queue"),
    # a broker limit below what the workers hold (the broker's fact, checked on the worker hosts)
    "a user connection limit below what the workers hold": (
        {"rabbitmq_app_user_max_connections": 2},
        "rabbitmq_app_user_max_connections of {broker} (2) is below the"),
    # role settings keep their own checks
    "an Erlang version without its epoch": ({"rabbitmq_erlang_version": "27.*"}, "rabbitmq_erlang_version"),
    "an evicting Redis with a broker user": ({"redis_maxmemory_policy": "allkeys-lru"}, "redis_maxmemory_policy"),
    # the roles' argument specs run in the preflight (entry point validate), not in their plays
    "a worker setting with an unknown choice": (
        {"celery_worker_log_level": "verbose"},
        "value of celery_worker_log_level must be one of: DEBUG, INFO, WARNING, ERROR, CRITICAL, debug"),
    "a Redis setting with an unknown choice": ({"redis_appendfsync": "sometimes"}, "redis_appendfsync must be one of"),
    "an environment given as a list": (
        {"celery_app_environment": ["DEBUG=1"]}, "argument 'celery_app_environment' is of type list"),
    # variables no role reads (celery_stack.core.unknown_variables)
    "a misspelt variable": (
        {"celery_stack_monitorng": False},
        "celery_stack_monitorng is not a variable of celery-stack: did you mean celery_stack_monitoring?"),
    # one rule per message, checked against what the target accepts (celery_stack.core, preflight.py)
    "a RabbitMQ user tag RabbitMQ does not know": (
        {"rabbitmq_users": [{"name": "ops", "password": "ops-secret-1", "tags": ["superuser"]}]},
        "rabbitmq_users[0] (ops).tags: 'superuser' is not a RabbitMQ user tag"),
    "a permission regex that does not compile": (
        {"rabbitmq_users": [{"name": "ops", "password": "ops-secret-1",
                             "permissions": [{"vhost": "celery", "read": "^(celery"}]}]},
        "rabbitmq_users[0] (ops).permissions[0].read '^(celery' is not a regular expression"),
    "a number where a password belongs": (
        {"celery_stack_broker_password": 123456789},
        "celery_stack_broker_password is a number, not a string: quote it"),
    "one password for two users": (
        {"celery_stack_broker_password": "same-secret-for-both", "celery_stack_redis_results_password": "same-secret-for-both"},
        "celery_stack_redis_results_password is the same as celery_stack_broker_password"),
    "the results user named like the Redis admin": (
        {"celery_stack_redis_results_user": "admin"},
        "celery_stack_redis_results_user is 'admin', the name of redis_admin_user"),
    "the application running as root": ({"celery_app_user": "root"}, "celery_app_user is root"),
    "an environment key with '='": (
        {"celery_app_environment": {"A=B": "1"}},
        "celery_app_environment: 'A=B' is not an environment variable name"),
    "a route pattern written as a regular expression": (
        {"celery_stack_queues": [{"name": "io", "tasks": ["re:.*"]}]},
        "celery_stack_queues[0] (io).tasks: 're:.*' looks like a regular expression"),
    "negative download retries": ({"celery_stack_network_retries": -1}, "celery_stack_network_retries must be at least 0"),
    "a RabbitMQ version the configured repository does not serve": (
        {"rabbitmq_version": "9.9.9-1"}, "rabbitmq_version '9.9.9-1' matches no version the configured repository serves"),
    "a TLS renewal window as long as the certificates": (
        {"celery_stack_tls": True, "tls_renew_days": 400},
        "tls_cert_days (365) must be greater than tls_renew_days (400)"),
    "client certificates without TLS (all-in-one: TLS off)": (
        {"celery_stack_tls_client_certificates": True},
        "celery_stack_tls_client_certificates is on while celery_stack_tls is off"),
    "a misspelt TLS variable": (
        {"tls_extra_name": ["mq.example.org"]}, "tls_extra_name is not a variable of celery-stack: did you mean tls_extra_names?"),
    "a directory given as kind file": (
        {"celery_stack_app": {"source": str(REPO / "examples" / "demo_app"), "kind": "file", "module": "app.celery"}},
        "celery_stack_app.kind is file but celery_stack_app.source"),
}


@pytest.fixture(scope="module")
def refusals():
    """Every case's site.yml run, four at a time (each is a whole preflight of a few seconds)."""
    with ThreadPoolExecutor(4) as pool:
        futures = {case: pool.submit(run, "site.yml", extra_vars) for case, (extra_vars, _) in CASES.items()}
        return {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_before_any_host_is_changed(case, refusals):
    # {broker}: the broker host as the scenario names it (default and ssh reuse these tests)
    import testinfra.utils.ansible_runner

    broker = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts("rabbitmq")[0]
    assert_refused_in_preflight(*refusals[case], CASES[case][1].replace("{broker}", broker))


@pytest.mark.parametrize("extra_vars", [
    {},
    # -e redis_port=6379 and YAML's "6379" arrive as strings: the spec converts them
    {"redis_port": "6379", "rabbitmq_amqp_port": "5672"},
    # an exact name under an earlier queue's glob is routed by name (Celery tries names first)
    {"celery_stack_queues": [{"name": "io", "tasks": [f"{DEMO}.*"]}, {"name": "cpu", "tasks": [f"{DEMO}.run_add"]}]},
    # the default vhost; ops-admin's two permission entries become one (the same regexes)
    {"celery_stack_broker_vhost": "/"},
    {"celery_stack_monitoring": "yes", "celery_stack_broker_password": "1234567890"},
], ids=["as deployed", "quoted ports", "exact name after a glob", "the default vhost", "yes and quoted digits"])
def test_valid_input_passes_the_preflight(extra_vars):
    result, out = run("playbooks/preflight.yml", extra_vars)
    assert result.returncode == 0, out


def test_a_prefork_concurrency_far_above_the_cores_is_a_warning():
    """Allowed (the team may know better), and said as Ansible's own warning, naming the setting."""
    result, out = run("playbooks/preflight.yml", {"celery_stack_queues": [
        {"name": "io", "tasks": ["x.*"], "pools": {"prefork": {"concurrency": 10000}}}]})
    assert result.returncode == 0, out
    assert "[WARNING]: io-prefork: prefork concurrency 10000 on a host with" in out, out
    assert "celery_stack_queues (io).pools.prefork.concurrency" in out, out


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


def test_a_host_in_both_worker_and_producer_groups_is_refused(tmp_path):
    """A worker host that is also a producer host would get two users' settings: refused in
    the preflight (it used to fail in the producers' play, at a chgrp)."""
    inventory = yaml.safe_load(pathlib.Path(os.environ["MOLECULE_INVENTORY_FILE"]).read_text())
    import testinfra.utils.ansible_runner

    worker = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"]).get_hosts(
        "celery_workers")[0]
    inventory.setdefault("all", {}).setdefault("children", {})["celery_producers"] = {"hosts": {worker: None}}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "group_vars").symlink_to(REPO / "inventories" / "local" / "group_vars")
    assert_refused_in_preflight(*run("site.yml", inventory=tmp_path / "hosts.yml"),
                                 f"{worker}: in both groups celery_workers and celery_producers")


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
    assert_refused_in_preflight(result, out, "celery_stack_producer_password is shorter than 8 characters")
    assert "s3cr" not in out


def test_queue_type_change_stops_the_run_before_the_workers():
    """One broker: the routed queues exist as classic queues. Asking for quorum queues must stop
    the broker play, naming the queue and the setting, before users or workers are touched."""
    result, out = run("site.yml", {"celery_stack_quorum_queues": True})
    assert result.returncode != 0, out
    assert "exists as a classic queue" in out and "celery_stack_quorum_queues" in out, out
    assert "PLAY [Provision the Celery workers]" not in out
    assert "Create the users and set their passwords" not in out
