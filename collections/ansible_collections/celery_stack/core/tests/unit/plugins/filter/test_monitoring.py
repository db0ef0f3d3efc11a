"""Unit tests of what the monitoring host scrapes and where it sends alerts
(plugins/filter/monitoring.py), run by `make test`.
"""

import re
import sys
from pathlib import Path

# collections/ on the import path, as Ansible's collection loader would put it.
sys.path.insert(0, str(Path(__file__).resolve().parents[7]))

from ansible_collections.celery_stack.core.plugins.filter import monitoring  # noqa: E402


def _unquoted(promql_string):
    """What RE2 gets once PromQL has read the double-quoted string."""
    return promql_string.replace("\\\\", "\\")


def test_promql_alternatives_match_exactly_the_names():
    pattern = _unquoted(monitoring.promql_alternatives(["io", "cpu", "io.dead-letter", "a+b"]))
    for name in ["io", "cpu", "io.dead-letter", "a+b"]:
        assert re.fullmatch(pattern, name)
    for name in ["iox", "io-dead-letter", "aab", "celeryev.x", ""]:
        assert not re.fullmatch(pattern, name)
    assert monitoring.promql_alternatives(["io", "cpu"]) == "io|cpu"


def test_promql_alternatives_of_nothing_match_nothing():
    assert not re.fullmatch(monitoring.promql_alternatives([]), "")
    assert not re.fullmatch(monitoring.promql_alternatives([]), "io")


def test_queue_matchers_of_the_routing_table():
    matchers = monitoring.queue_matchers([{"name": "io", "pools": {}}, {"name": "cpu", "pools": {}}])
    assert matchers == {"routed": "io|cpu", "dead_letter": "io\\\\.dead-letter|cpu\\\\.dead-letter"}
    assert re.fullmatch(_unquoted(matchers["dead_letter"]), "io.dead-letter")
    assert not re.fullmatch(_unquoted(matchers["dead_letter"]), "io-dead-letter")


def test_scrape_targets_dial_the_stack_address_and_name_the_hosts():
    hostvars = {"mon": {}, "mq1": {"celery_stack_address": "10.0.0.11"}, "mq2": {"rabbitmq_prometheus_tls_port": 9443}}
    configs = monitoring.scrape_targets(["mq1", "mq2", "mon"], hostvars, 15691, "rabbitmq_prometheus_tls_port")
    assert configs == [
        {"targets": ["10.0.0.11:15691"], "labels": {"instance": "mq1"}},
        {"targets": ["mq2:9443"], "labels": {"instance": "mq2"}},
        # the monitoring host itself too: the exporters do not listen on loopback
        {"targets": ["mon:15691"], "labels": {"instance": "mon"}},
    ]
    assert monitoring.scrape_targets([], hostvars, 1) == []


def test_alertmanager_config_sends_everything_to_the_inventory_receiver():
    receiver = {"webhook_configs": [{"url": "http://127.0.0.1:9099/alerts"}]}
    config = monitoring.alertmanager_config(receiver, "5s", "10s", "4h")
    assert config["route"]["receiver"] == "celery-stack"
    assert config["route"]["group_wait"] == "5s" and config["route"]["repeat_interval"] == "4h"
    assert config["receivers"] == [{"name": "celery-stack", "webhook_configs": [{"url": "http://127.0.0.1:9099/alerts"}]}]
    assert "queue" in config["route"]["group_by"]
    assert receiver == {"webhook_configs": [{"url": "http://127.0.0.1:9099/alerts"}]}
