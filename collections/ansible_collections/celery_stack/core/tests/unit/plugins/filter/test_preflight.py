"""Unit tests of the preflight's rules (plugins/filter/preflight.py), run by `make test`.

One case per class of mistake the preflight refuses: each must give exactly one message for
one mistake, naming the variable the user wrote, and never the secret's value. Valid unusual
values give none. The molecule test (molecule/default/tests/test_preflight.py) runs a few of
them through a real preflight.
"""

import sys
from pathlib import Path

import pytest
import yaml

# collections/ on the import path, as Ansible's collection loader would put it.
sys.path.insert(0, str(Path(__file__).resolve().parents[7]))

from ansible_collections.celery_stack.core.plugins.filter import preflight  # noqa: E402

ROOT = Path(__file__).resolve().parents[8]
GROUPS = {"rabbitmq": ["mq1"], "redis": ["r1"], "celery_workers": ["w1"], "celery_producers": ["web1"]}
STACK = {
    "celery_stack_broker": "rabbitmq", "celery_stack_result_backend": "redis",
    "celery_stack_broker_vhost": "celery", "celery_stack_broker_user": "celery",
    "celery_stack_broker_password": "broker-secret", "celery_stack_producer_user": "celery-producer",
    "celery_stack_producer_password": "producer-secret", "celery_stack_redis_results_user": "celery-results",
    "celery_stack_redis_results_password": "results-secret-16+", "celery_stack_network_retries": 4,
}


def one(found, *expected):
    """Exactly one message, containing every expected text."""
    assert len(found) == 1, found
    for text in expected:
        assert text in found[0], found
    return found[0]


# --- unknown variables -----------------------------------------------------------------------

def test_known_variables_come_from_every_roles_spec():
    known = preflight.known_variables(ROOT / "roles")
    for name in ("celery_stack_monitoring", "celery_worker_log_level", "rabbitmq_version", "redis_admin_password",
                 "celery_flower_log_level", "celery_app_environment"):
        assert name in known


def test_a_misspelt_variable_is_refused_with_the_closest_name():
    message = one(preflight.unknown_variables(["celery_stack_monitorng", "celery_stack_monitoring", "ansible_host"],
                                              ["celery_stack_monitoring"]),
                  "celery_stack_monitorng", "did you mean celery_stack_monitoring?")
    assert "celery_stack_preflight_allowed_variables" in message


def test_internal_and_allowed_variables_are_not_refused():
    names = ["rabbitmq__consumer_timeout", "redis_exporter_port", "redis_exporter_address", "local_container"]
    assert preflight.unknown_variables(names, [], ["redis_exporter_.*"]) == []
    one(preflight.unknown_variables(names, [], ["redis_exporter_port"]), "redis_exporter_address")


def test_every_shipped_inventory_uses_known_names_only():
    """The inventories and scenarios this repository ships name no variable the roles do not
    read (the preflight would refuse them)."""
    import yaml
    known = preflight.known_variables(ROOT / "roles")
    names = set()
    for path in list(ROOT.glob("inventories/**/*.yml")) + list(ROOT.glob("molecule/*/group_vars/**/*.yml")) \
            + list(ROOT.glob("molecule/*/host_vars/*.yml")):
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, dict):
            names.update(k for k in data if isinstance(k, str))
    assert preflight.unknown_variables(names, known) == []


# --- the stack ---------------------------------------------------------------------------------

def test_a_valid_stack_has_no_problem():
    assert preflight.stack_problems(STACK, GROUPS) == []
    assert preflight.stack_problems(dict(STACK, celery_stack_broker_vhost="/"), GROUPS) == []


@pytest.mark.parametrize("change, expected", [
    ({"celery_stack_broker_password": ""}, "celery_stack_broker_password is not set"),
    ({"celery_stack_broker_password": "short"}, "celery_stack_broker_password is shorter than 8"),
    ({"celery_stack_broker_password": 12345678}, "celery_stack_broker_password is a number, not a string: quote it"),
    ({"celery_stack_producer_password": "two\nlines-secret"}, "celery_stack_producer_password contains a line break"),
    ({"celery_stack_producer_password": "broker-secret"},
     "celery_stack_producer_password is the same as celery_stack_broker_password"),
    ({"celery_stack_producer_user": "celery"}, "celery_stack_producer_user is 'celery', the same as celery_stack_broker_user"),
    ({"celery_stack_redis_results_user": "default"}, "celery_stack_redis_results_user is 'default'"),
    ({"celery_stack_redis_results_password": "short-secret"}, "celery_stack_redis_results_password is shorter than 16"),
    ({"celery_stack_broker_vhost": "my vhost"}, "celery_stack_broker_vhost 'my vhost' contains a space"),
    ({"celery_stack_broker_user": "cel ery"}, "celery_stack_broker_user 'cel ery' is not a valid RabbitMQ user name"),
    ({"celery_stack_network_retries": -1}, "celery_stack_network_retries must be at least 0, got -1"),
    ({"celery_stack_broker": "redis", "celery_stack_result_backend": "rpc", "celery_stack_redis_broker_user": "b",
      "celery_stack_redis_broker_password": "broker-redis-secret"}, "celery_stack_result_backend rpc"),
])
def test_one_stack_mistake_one_message(change, expected):
    message = one(preflight.stack_problems(dict(STACK, **change), GROUPS), expected)
    for secret in ("broker-secret", "producer-secret", "short", "lines-secret", "12345678"):
        if secret not in expected:
            assert secret not in message


def test_client_certificates_need_tls():
    for tls in (True, "True"):  # a templated default arrives as a string on older Ansible
        assert preflight.stack_problems(dict(STACK, celery_stack_tls=tls,
                                             celery_stack_tls_client_certificates=True), GROUPS) == []
    for tls in (False, "False", None):
        one(preflight.stack_problems(dict(STACK, celery_stack_tls=tls, celery_stack_tls_client_certificates=True),
                                     GROUPS),
            "celery_stack_tls_client_certificates is on while celery_stack_tls is off")
    assert preflight.stack_problems(dict(STACK, celery_stack_tls=False,
                                         celery_stack_tls_client_certificates=False), GROUPS) == []


def test_a_host_in_both_worker_and_producer_groups_is_refused():
    one(preflight.stack_problems(STACK, dict(GROUPS, celery_producers=["web1", "w1"])),
        "w1: in both groups celery_workers and celery_producers")


def test_the_producers_password_is_required_only_with_producer_hosts():
    stack = dict(STACK, celery_stack_producer_password=None)
    assert preflight.stack_problems(stack, dict(GROUPS, celery_producers=[])) == []
    one(preflight.stack_problems(stack, GROUPS), "celery_stack_producer_password is not set")


@pytest.mark.parametrize("pattern", ["re:.*", "app\\.tasks\\..*", "app.(crawl|parse)", "app.tasks.crawl?", "a b"])
def test_a_route_pattern_like_a_regular_expression_is_refused(pattern):
    one(preflight.route_pattern_problems([{"name": "io", "tasks": [pattern]}]),
        "celery_stack_queues[0] (io).tasks", repr(pattern))


@pytest.mark.parametrize("queues, expected", [
    ([{"name": "amq.io", "tasks": []}], "RabbitMQ keeps names starting with amq."),
    ([{"name": "io", "tasks": []}, {"name": "io.dead-letter", "tasks": []}], "is the dead-letter queue of queue io"),
])
def test_queue_names_the_broker_or_the_bundle_keep(queues, expected):
    one(preflight.route_pattern_problems(queues), expected)


def test_addresses():
    one(preflight.stack_problems(dict(STACK, celery_stack_listen_address="eth0"), GROUPS),
        "celery_stack_listen_address 'eth0' must be an IP address")
    one(preflight.stack_problems(dict(STACK, celery_stack_address="my host"), GROUPS),
        "celery_stack_address 'my host' must be a host name or an IP address")


@pytest.mark.parametrize("queues, expected", [
    ({"io": {}}, "celery_stack_queues must be a list of queues"),
    (["io"], "celery_stack_queues[0] must be a mapping"),
    ([{"name": "io", "pools": ["prefork"]}], "celery_stack_queues[0] (io).pools must be a mapping"),
    ([{"name": "io", "pools": {"prefork": 4}}], "celery_stack_queues[0] (io).pools.prefork must be a mapping"),
])
def test_the_table_shape_is_checked_before_the_spec(queues, expected):
    one(preflight.table_shape_problems(queues), expected)


def test_names_and_globs_are_route_patterns():
    assert preflight.route_pattern_problems([{"name": "io", "tasks": ["app.tasks.crawl*", "a.b:c", "*"]}]) == []


# --- the application ---------------------------------------------------------------------------

APP = {"celery_app_user": "celery", "celery_app_group": "celery", "celery_app_environment": {"DJANGO_DEBUG": "0"},
       "celery_app_prefetch_multiplier": 1, "celery_app_task_worker_lost_limit": 3, "celery_app_releases_kept": 2,
       "celery_app_broker": {"type": "rabbitmq", "hosts": ["mq1"], "user": "celery", "password": "x" * 8},
       "celery_app_result_backend": {"type": "redis", "user": "celery-results", "password": "y" * 16}}


@pytest.mark.parametrize("change, expected", [
    ({"celery_app_user": "root"}, "celery_app_user is root"),
    ({"celery_app_user": "my user"}, "celery_app_user 'my user' is not a valid Linux account name"),
    ({"celery_app_group": "Celery"}, "celery_app_group 'Celery' is not a valid Linux account name"),
    ({"celery_app_environment": {"A=B": "1"}}, "celery_app_environment: 'A=B' is not an environment variable name"),
    ({"celery_app_environment": {"A": "1\n2"}}, "celery_app_environment.A contains a line break"),
    ({"celery_app_pip_environment": {"PIP_INDEX_URL": ["x"]}}, "celery_app_pip_environment.PIP_INDEX_URL must be"),
    ({"celery_app_releases_kept": 0}, "celery_app_releases_kept must be at least 1, got 0"),
    ({"celery_app_prefetch_multiplier": "many"}, "celery_app_prefetch_multiplier must be a whole number"),
    ({"celery_app_celery_version": "latest"}, "celery_app_celery_version 'latest' is not an exact version"),
    ({"celery_app_celery_version": "4.4.7"}, "the roles are written for Celery 5"),
    ({"celery_app_celery_extras": ["redis", "bad extra"]}, "celery_app_celery_extras: 'bad extra'"),
    ({"celery_app_pip_packages": ["requests>>2"]}, "celery_app_pip_packages: 'requests>>2' is not a pip requirement"),
    ({"celery_app_base_dir": "opt/celery"}, "celery_app_base_dir must be an absolute path"),
    ({"celery_app_soft_shutdown_timeout": -1}, "celery_app_soft_shutdown_timeout must be a number of seconds"),
    ({"celery_app_services": ["celery-worker@io-threads.service"]}, "is the bundle's own unit"),
])
def test_one_app_mistake_one_message(change, expected):
    one(preflight.app_problems(dict(APP, **change)), expected)


def test_a_valid_app_has_no_problem():
    assert preflight.app_problems(dict(APP, celery_app_environment={"A": 1, "B": True, "C": None},
                                       celery_app_pip_packages=["django>=4.2,<6", "git+https://x/y.git", "./pkg"],
                                       celery_app_services=["gunicorn.service"])) == []


def test_a_broker_quorum_that_contradicts_the_stacks_queue_types_is_refused():
    # The workers declare the stack's one typed table, the one the brokers check: an app-level
    # quorum may repeat the stack's decision (quorum, the second argument), not contradict it.
    with_quorum = dict(APP, celery_app_broker=dict(APP["celery_app_broker"], quorum=False))
    one(preflight.app_problems(with_quorum, True),
        "celery_app_broker.quorum is False, but the stack's routed queues are quorum queues "
        "(celery_stack_quorum_queues; unset: quorum with more than one host in the group rabbitmq)")
    assert preflight.app_problems(with_quorum, False) == []
    assert preflight.app_problems(with_quorum, "False") == []  # a templated bool arrives as a string
    assert preflight.app_problems(APP, True) == preflight.app_problems(APP, False) == []  # quorum left out
    redis = dict(APP, celery_app_broker=dict(APP["celery_app_broker"], type="redis", quorum=True))
    assert preflight.app_problems(redis, False) == []  # no queue types on Redis


# --- RabbitMQ --------------------------------------------------------------------------------

RABBITMQ = {"rabbitmq_repository_preset": "team", "rabbitmq_version": "4.1.*", "rabbitmq_erlang_version": "1:27.*",
            "rabbitmq_vm_memory_high_watermark": 0.6, "rabbitmq_disk_free_limit": "2GB",
            "rabbitmq_consumer_timeout": 1800000, "rabbitmq_limit_nofile": 65536, "rabbitmq_nodename": "rabbit",
            "rabbitmq_cluster_wait_retries": 60, "rabbitmq_amqp_port": "5672",
            "rabbitmq_plugins": ["rabbitmq_management"], "rabbitmq_loopback_users": ["guest"],
            "rabbitmq_vhosts": [], "rabbitmq_erlang_cookie": ""}
OPS = {"name": "ops", "password": "ops-secret", "tags": ["administrator"],
       "permissions": [{"vhost": "celery", "configure": ".*", "write": ".*", "read": ".*"}]}


def test_valid_broker_settings_have_no_problem():
    assert preflight.rabbitmq_problems(RABBITMQ) == []
    for tls in (True, False):
        assert preflight.rabbitmq_problems(dict(RABBITMQ, rabbitmq_inter_node_tls=tls, celery_stack_tls=True)) == []
    assert preflight.rabbitmq_problems(dict(RABBITMQ, rabbitmq_inter_node_tls=False, celery_stack_tls=False)) == []
    # the same permissions twice for one vhost (the stack's vhost set to "/"): merged, accepted
    ops = dict(OPS, permissions=OPS["permissions"] * 2)
    assert preflight.rabbitmq_user_problems([ops], ["celery", "/"], ["celery"]) == []


@pytest.mark.parametrize("change, expected", [
    ({"rabbitmq_version": "latest"}, "rabbitmq_version 'latest' must be an apt version pattern"),
    ({"rabbitmq_erlang_version": "27.*"}, "rabbitmq_erlang_version '27.*' must be an apt version pattern WITH"),
    ({"rabbitmq_erlang_version": "1:25.*"}, "needs Erlang 26.2 or later"),
    ({"rabbitmq_vm_memory_high_watermark": 1.5}, "rabbitmq_vm_memory_high_watermark must be a fraction"),
    ({"rabbitmq_disk_free_limit": "lots"}, "rabbitmq_disk_free_limit must be bytes"),
    ({"rabbitmq_consumer_timeout": 10}, "rabbitmq_consumer_timeout must be at least 1000 ms"),
    ({"rabbitmq_amqp_port": 70000}, "rabbitmq_amqp_port must be a port number"),
    ({"rabbitmq_nodename": "rabbit@a b"}, "rabbitmq_nodename must be a node name"),
    ({"rabbitmq_management_port": 5672}, "rabbitmq_management_port is 5672, the port of rabbitmq_amqp_port"),
    ({"rabbitmq_config_extra": {"log.console.level": ["info"]}}, "rabbitmq_config_extra.log.console.level must be a single"),
    ({"rabbitmq_env_extra": {"BAD KEY": "1"}}, "rabbitmq_env_extra: 'BAD KEY' is not an environment variable name"),
    ({"rabbitmq_erlang_cookie": "short"}, "rabbitmq_erlang_cookie must be 20 to 255 letters"),
    ({"rabbitmq_inter_node_tls": True, "celery_stack_tls": False}, "rabbitmq_inter_node_tls needs celery_stack_tls"),
    ({"rabbitmq_inter_node_tls": "True", "celery_stack_tls": "False"}, "rabbitmq_inter_node_tls needs celery_stack_tls"),
    ({"rabbitmq_repository_preset": "custom", "rabbitmq_repository_custom_url": "http://m",
      "rabbitmq_repository_custom_key_url": "http://m/k.asc", "rabbitmq_repository_custom_key_fingerprint": "AB"},
     "rabbitmq_repository_custom_key_fingerprint must be the key's full fingerprint"),
    ({"rabbitmq_app_user_max_connections": 0}, "rabbitmq_app_user_max_connections must be -1 (no limit) or at least 1"),
    ({"rabbitmq_vhost_max_queues": -5}, "rabbitmq_vhost_max_queues must be -1 (no limit) or at least 1, got -5"),
    ({"rabbitmq_producer_user_max_channels": "many"}, "rabbitmq_producer_user_max_channels must be -1"),
])
def test_one_broker_mistake_one_message(change, expected):
    one(preflight.rabbitmq_problems(dict(RABBITMQ, **change)), expected)


@pytest.mark.parametrize("change, expected", [
    ({"tags": ["superuser"]}, "rabbitmq_users[0] (ops).tags: 'superuser' is not a RabbitMQ user tag"),
    ({"permissions": [{"vhost": "celery", "configure": "^(celery"}]},
     "rabbitmq_users[0] (ops).permissions[0].configure '^(celery' is not a regular expression"),
    ({"permissions": [{"vhost": "other"}]}, "rabbitmq_users[0] (ops).permissions[0].vhost 'other' is not a vhost"),
    ({"permissions": [{"vhost": "celery", "read": ".*"}, {"vhost": "celery", "read": "^$"}]},
     "a second, different entry for vhost 'celery'"),
    ({"name": "celery"}, "the name is already one of the stack's users"),
    ({"name": "guest"}, "guest is removed while rabbitmq_remove_guest is true"),
    ({"password": 123456789}, "rabbitmq_users[0] (ops).password is a number"),
])
def test_one_broker_user_mistake_one_message(change, expected):
    one(preflight.rabbitmq_user_problems([dict(OPS, **change)], ["celery", "/"], ["celery"]), expected)


MADISON = """rabbitmq-server | 4.0.5-1+mirror1 | http://mirror/rabbitmq-server/debian/trixie trixie/main amd64 Packages
rabbitmq-server | 3.10.8-1 | http://deb.debian.org/debian bookworm/main amd64 Packages
erlang-base | 1:27.3.4.1-1 | http://deb.debian.org/debian trixie/main amd64 Packages
"""


def test_a_pin_the_configured_repository_does_not_serve_is_refused():
    served = preflight.served_versions(MADISON, "rabbitmq-server", ["http://mirror/rabbitmq-server/debian/trixie"])
    assert served == ["4.0.5-1+mirror1"]
    assert preflight.version_problems("4.0.5-*", served, "rabbitmq_version") == []
    one(preflight.version_problems("4.9.*", served, "rabbitmq_version"), "rabbitmq_version '4.9.*' matches no version",
        "4.0.5-1+mirror1")
    # a repository not configured yet (a fresh host): nothing to compare with
    assert preflight.version_problems("4.9.*", preflight.served_versions(MADISON, "erlang-base", ["http://x"]),
                                      "rabbitmq_erlang_version") == []


def test_cluster_problems():
    assert preflight.rabbitmq_cluster_problems(["rabbit@a", "rabbit@b"], "rabbit@a", "c" * 20) == []
    one(preflight.rabbitmq_cluster_problems(["rabbit@a", "rabbit@b"], "rabbit@a", ""), "rabbitmq_erlang_cookie must be set")
    one(preflight.rabbitmq_cluster_problems(["rabbit@a", "rabbit@b"], "rabbit@c", "c" * 20), "rabbit@c is not among")


# --- Redis, workers, Flower ------------------------------------------------------------------

REDIS = {"redis_bind": ["127.0.0.1"], "redis_port": "6379", "redis_maxmemory": "512mb", "redis_databases": 16,
         "redis_admin_user": "admin", "redis_admin_password": "a" * 16}


@pytest.mark.parametrize("change, expected", [
    ({"redis_admin_password": 1234567890123456789}, "redis_admin_password is a number"),
    ({"redis_admin_password": None}, "redis_admin_password is not set"),
    ({"redis_maxmemory": "lots"}, "redis_maxmemory must be a number"),
    ({"redis_port": 0}, "redis_port must be a port number"),
    ({"redis_admin_user": "default"}, "redis_admin_user must not be \"default\""),
    ({"redis_bind": ["127.0.0.1", "localhost"]}, "redis_bind: 'localhost' is not an IP address"),
    ({"redis_save": ["3600"]}, "redis_save: '3600' is not a snapshot rule"),
])
def test_one_redis_mistake_one_message(change, expected):
    assert preflight.redis_problems(REDIS) == []
    one(preflight.redis_problems(dict(REDIS, **change)), expected)


def test_redis_users():
    reserved = {"celery_stack_redis_results_user": "celery-results", "celery_stack_redis_broker_user": ""}
    one(preflight.redis_user_problems([], {"celery_result_backend": {}}, "celery-results", reserved),
        "celery_stack_redis_results_user is 'celery-results', the name of redis_admin_user")
    one(preflight.redis_user_problems([{"name": "celery-results", "password": "p" * 16}], {}, "admin", reserved),
        "already the stack's user (celery_stack_redis_results_user)")
    one(preflight.redis_user_problems([{"name": "ops", "password": "p" * 16, "preset": "bogus"}], {"x": {}}),
        "redis_users[0] (ops).preset 'bogus' is not one of redis_acl_presets")


def test_worker_settings():
    settings = {"celery_worker_health_interval": 60, "celery_worker_health_timeout": 5,
                "celery_worker_restart_hosts_at_once": 1, "celery_worker_pool_defaults": {"prefork": {"concurrency": 4}}}
    assert preflight.worker_problems(settings) == []
    one(preflight.worker_problems(dict(settings, celery_worker_health_interval=5)),
        "celery_worker_health_interval (5 s) must be longer than celery_worker_health_timeout (5 s)")
    one(preflight.worker_problems(dict(settings, celery_worker_pool_defaults=None)),
        "celery_worker_pool_defaults must be a mapping")
    one(preflight.worker_problems(dict(settings, celery_worker_restart_hosts_at_once=0)),
        "celery_worker_restart_hosts_at_once must be at least 1")
    one(preflight.worker_problems(dict(settings, celery_worker_read_write_paths=["data"])),
        "celery_worker_read_write_paths: 'data' must be an absolute path")
    one(preflight.worker_problems(dict(settings, celery_worker_state_dir_name="a/b")),
        "celery_worker_state_dir_name 'a/b' must be one directory name")


def test_a_prefork_concurrency_far_above_the_cores_is_a_warning():
    instances = [{"instance": "cpu-prefork", "queue": "cpu", "pool": "prefork", "concurrency": 10000},
                 {"instance": "io-threads", "queue": "io", "pool": "threads", "concurrency": 10000},
                 {"instance": "io-prefork", "queue": "io", "pool": "prefork", "concurrency": 8}]
    one(preflight.worker_warnings(instances, 2), "cpu-prefork: prefork concurrency 10000 on a host with 2 CPU cores")


def test_flower_settings():
    settings = {"celery_flower_users": [{"name": "ops", "password": "flower-secret-1"}],
                "celery_flower_address": "127.0.0.1", "celery_flower_port": 5555, "celery_flower_max_tasks": 10000,
                "celery_flower_purge_offline_workers": 600, "celery_flower_version": "2.2.0"}
    assert preflight.flower_problems(settings, True) == []
    one(preflight.flower_problems(dict(settings, celery_flower_users=[]), True), "celery_flower_users needs")
    message = one(preflight.flower_problems(dict(settings, celery_flower_users=[{"name": "ops", "password": "a:b-c,d-e-f-g"}])),
                  "celery_flower_users[0] (ops).password contains ':' or ','")
    assert "a:b-c" not in message


# --- celery_monitoring -------------------------------------------------------------------------

MONITORING_DEFAULTS = yaml.safe_load((ROOT / "roles/celery_monitoring/defaults/main.yml").read_text())


def monitoring(**overrides):
    return {**MONITORING_DEFAULTS, "celery_monitoring_receiver": {"webhook_configs": [{"url": "http://127.0.0.1:9099/"}]},
            **overrides}


def test_the_monitoring_defaults_pass_with_a_receiver():
    assert preflight.monitoring_problems(monitoring()) == []
    flower = {"celery_flower_users": [{"name": "ops", "password": "x" * 12}], "celery_flower_address": "0.0.0.0"}
    assert preflight.monitoring_problems(monitoring(), ["worker2"], flower, "mon") == []


def test_monitoring_without_a_receiver_is_refused():
    one(preflight.monitoring_problems(dict(MONITORING_DEFAULTS)), "celery_monitoring_receiver must name where")
    one(preflight.monitoring_problems(monitoring(celery_monitoring_receiver={"webhook_configs": []})),
        "celery_monitoring_receiver must name where")
    one(preflight.monitoring_problems(monitoring(celery_monitoring_receiver={"name": "x", "webhook_configs": [{}]})),
        "celery_monitoring_receiver has a name")


@pytest.mark.parametrize("value", ["5 minutes", "5", "", "0s", "5m3h", None])
def test_monitoring_durations_are_prometheus_durations(value):
    one(preflight.monitoring_problems(monitoring(celery_monitoring_queue_without_consumer_for=value)),
        "celery_monitoring_queue_without_consumer_for must be a Prometheus duration")


def test_monitoring_ratios_ports_and_counts():
    one(preflight.monitoring_problems(monitoring(celery_monitoring_task_failure_ratio=10)),
        "celery_monitoring_task_failure_ratio must be a number between 0 and 1")
    one(preflight.monitoring_problems(monitoring(celery_monitoring_redis_memory_ratio=True)), "between 0 and 1")
    one(preflight.monitoring_problems(monitoring(celery_monitoring_prometheus_port=0)), "celery_monitoring_prometheus_port")
    one(preflight.monitoring_problems(monitoring(celery_monitoring_queue_depth=0)), "celery_monitoring_queue_depth")


def test_prometheus_must_reach_flower_as_one_of_its_users():
    flower = {"celery_flower_users": [{"name": "ops", "password": "x" * 12}], "celery_flower_address": "127.0.0.1"}
    one(preflight.monitoring_problems(monitoring(), ["worker2"], flower, "mon"),
        "celery_flower_address is 127.0.0.1 on worker2: Prometheus on mon scrapes Flower at worker2's stack address")
    # on the Flower host itself too: Prometheus dials the host's name, not loopback
    one(preflight.monitoring_problems(monitoring(), ["worker2"], flower, "worker2"), "celery_flower_address")
    one(preflight.monitoring_problems(monitoring(celery_monitoring_flower_user="prom"), ["worker2"],
                                      dict(flower, celery_flower_address="10.0.0.2"), "mon"),
        "celery_monitoring_flower_user is 'prom', which is not one of celery_flower_users (ops)")


# --- the exporters (celery_stack_exporters) ----------------------------------------------------

def test_the_redis_exporters_password_is_required_only_with_exporters_and_redis():
    exporters = dict(STACK, celery_stack_exporters=True)
    one(preflight.stack_problems(exporters, GROUPS), "celery_stack_redis_exporter_password is not set")
    assert preflight.stack_problems(exporters, dict(GROUPS, redis=[])) == []
    assert preflight.stack_problems(dict(STACK, celery_stack_exporters=False), GROUPS) == []
    assert preflight.stack_problems(dict(exporters, celery_stack_redis_exporter_password="exporter-secret-16+"),
                                    GROUPS) == []


@pytest.mark.parametrize("change, expected", [
    ({"celery_stack_redis_exporter_password": "short-secret"}, "celery_stack_redis_exporter_password is shorter than 16"),
    ({"celery_stack_redis_exporter_password": "results-secret-16+"},
     "celery_stack_redis_exporter_password is the same as celery_stack_redis_results_password"),
    ({"celery_stack_redis_exporter_user": "celery-results"},
     "celery_stack_redis_exporter_user and celery_stack_redis_results_user are the same name"),
    ({"celery_stack_redis_exporter_user": "default"}, "celery_stack_redis_exporter_user is 'default'"),
    ({"celery_stack_redis_exporter_user": "exp orter"}, "celery_stack_redis_exporter_user 'exp orter' is not a valid"),
])
def test_one_exporter_user_mistake_one_message(change, expected):
    stack = dict(STACK, celery_stack_exporters=True, celery_stack_redis_exporter_password="exporter-secret-16+")
    message = one(preflight.stack_problems(dict(stack, **change), GROUPS), expected)
    assert "exporter-secret-16+" not in message and "short-secret" not in message


def test_the_exporters_prefix_is_the_bundles():
    one(preflight.unknown_variables(["prometheus_exporters_node_prot"], ["prometheus_exporters_node_port"]),
        "did you mean prometheus_exporters_node_port?")


@pytest.mark.parametrize("value", [-1, 1, 4000, "1000"])
def test_broker_limits_no_limit_or_positive(value):
    assert preflight.rabbitmq_problems(dict(RABBITMQ, rabbitmq_vhost_max_connections=value,
                                            rabbitmq_app_user_max_channels=value)) == []
