"""Unit tests of the connection URLs and host addresses (plugins/filter/addresses.py), run by
`make test`.
"""

import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

# collections/ on the import path, as Ansible's collection loader would put it.
sys.path.insert(0, str(Path(__file__).resolve().parents[7]))

from ansible_collections.celery_stack.core.plugins.filter import addresses  # noqa: E402

# --- URLs ----------------------------------------------------------------------------------------

def test_broker_url_percent_encodes_credentials_and_vhost():
    url = addresses.broker_url(["mq1", "mq2"], "rabbitmq", "app@corp", "p@ss:w/rd#%", "celery/prod")
    assert url == ("amqp://app%40corp:p%40ss%3Aw%2Frd%23%25@mq1:5672/celery%2Fprod;"
                   "amqp://app%40corp:p%40ss%3Aw%2Frd%23%25@mq2:5672/celery%2Fprod")
    first = urlsplit(url.split(";")[0])
    assert (unquote(first.username), unquote(first.password)) == ("app@corp", "p@ss:w/rd#%")
    assert addresses.broker_url(["mq1"], "rabbitmq", "u", "p", "/") == "amqp://u:p@mq1:5672/%2F"
    assert addresses.broker_url(["r1"], "redis", "u", "p", db=2) == "redis://u:p@r1:6379/2"
    assert addresses.broker_url(["mq1"], "rabbitmq", "u", "p", "v", port="5673") == "amqp://u:p@mq1:5673/v"


def test_redis_url():
    assert addresses.redis_url("10.0.0.2", "6380", 0, "celery-results", "p@ss:w/rd#%") == \
        "redis://celery-results:p%40ss%3Aw%2Frd%23%25@10.0.0.2:6380/0"


def test_urls_over_tls():
    # RabbitMQ's TLS port is its own (5671); Redis serves TLS on its usual port
    assert addresses.broker_url(["mq1", "mq2"], "rabbitmq", "u", "p", "v", tls=True) == \
        "amqps://u:p@mq1:5671/v;amqps://u:p@mq2:5671/v"
    assert addresses.broker_url(["mq1"], "rabbitmq", "u", "p", "v", port=5675, tls=True) == "amqps://u:p@mq1:5675/v"
    assert addresses.broker_url(["r1"], "redis", "u", "p", db=1, tls=True) == "rediss://u:p@r1:6379/1"
    assert addresses.redis_url("r1", 6379, 0, "u", "p", tls=True) == "rediss://u:p@r1:6379/0"


# --- hosts ---------------------------------------------------------------------------------------

def test_addresses():
    hostvars = {"mq1": {"ansible_facts": {"hostname": "broker-a"}}, "mq2.example.org": {"celery_stack_address": "10.0.0.12"},
                "mq3": {"rabbitmq_nodename": "rabbit@custom"}}
    assert addresses.addresses(["mq1", "mq2.example.org"], "mq1", hostvars) == ["127.0.0.1", "10.0.0.12"]
    assert addresses.addresses(["mq1"], "w1", hostvars) == ["mq1"]


def test_spread_gives_each_client_its_first_broker():
    brokers, clients = ["mq1", "mq2", "mq3"], ["w1", "w2", "web1", "web2"]
    firsts = [addresses.spread(brokers, client, clients)[0] for client in clients]
    assert firsts == ["mq1", "mq2", "mq3", "mq1"]  # round-robin over the clients
    assert sorted(addresses.spread(brokers, "w2", clients)) == brokers  # every broker stays, to fail over
    assert addresses.spread(brokers, "mq3", clients + ["mq3"]) == ["mq3", "mq1", "mq2"]  # on a broker: itself
    assert addresses.spread(brokers, "elsewhere", clients) == brokers
    assert addresses.spread([], "w1", clients) == []


def test_host_values():
    hostvars = {"mq1": {"rabbitmq__consumer_timeout": 5}, "mq2": {}}
    assert addresses.host_values(["mq1", "mq2"], hostvars, "rabbitmq__consumer_timeout") == {"mq1": 5, "mq2": None}
