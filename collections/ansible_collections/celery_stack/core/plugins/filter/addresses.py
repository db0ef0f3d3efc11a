# -*- coding: utf-8 -*-
"""How the hosts reach each other: connection URLs, addresses, the order of the brokers.

- ``broker_url``, ``redis_url``: connection URLs with percent-encoded credentials;
- ``addresses``, ``spread``: how a host reaches the hosts of a group, and in which order it
  tries the brokers;
- ``host_values``: one variable of several hosts.

Nothing here touches a host. Unit tests: tests/unit/plugins/filter/test_addresses.py.
"""

from urllib.parse import quote


def _credentials(user, password):
    # quote(safe="") encodes every reserved character, "/" included (Jinja's urlencode keeps it).
    return f"{quote(str(user), safe='')}:{quote(str(password), safe='')}@" if user or password else ""


# (scheme, default port) per broker, plain and over TLS (celery_stack_tls): RabbitMQ has a port
# of its own for TLS, Redis serves TLS on its usual port.
SCHEMES = {("rabbitmq", False): ("amqp", 5672), ("rabbitmq", True): ("amqps", 5671),
           ("redis", False): ("redis", 6379), ("redis", True): ("rediss", 6379)}


def broker_url(hosts, broker="rabbitmq", user="", password="", vhost="/", db=0, port=None, tls=False):
    """Every broker host, `;`-separated, so kombu fails over between them."""
    scheme, default_port = SCHEMES[(broker, bool(tls))]
    path = quote(str(vhost), safe="") if broker == "rabbitmq" else str(int(db))
    port = int(port or default_port)
    return ";".join(f"{scheme}://{_credentials(user, password)}{h}:{port}/{path}" for h in hosts)


def redis_url(host, port=6379, db=0, user="", password="", tls=False):
    scheme = SCHEMES[("redis", bool(tls))][0]
    return f"{scheme}://{_credentials(user, password)}{host}:{int(port)}/{int(db)}"


def addresses(hosts, inventory_hostname, hostvars):
    """How `inventory_hostname` reaches each host: itself on 127.0.0.1, the others by their
    celery_stack_address (default: the inventory name, resolved by DNS)."""
    return ["127.0.0.1" if h == inventory_hostname else (hostvars[h].get("celery_stack_address") or h)
            for h in hosts]


def spread(hosts, client, clients):
    """The broker hosts in the order `client` tries them: this host first when it is one of them,
    else rotated by the client's place among all clients, so that the clients (worker and
    producer hosts) connect to the brokers round-robin instead of all to the first. The others
    stay in the list: kombu fails over to the next one."""
    hosts = list(hosts)
    if not hosts:
        return hosts
    if client in hosts:
        start = hosts.index(client)
    else:
        start = list(clients).index(client) % len(hosts) if client in clients else 0
    return hosts[start:] + hosts[:start]


def host_values(hosts, hostvars, name):
    """{host: that host's variable `name`, None where it has none} (hostvars[h].name would fail)."""
    return {h: hostvars[h].get(name) for h in hosts}


class FilterModule:
    def filters(self):
        return {f.__name__: f for f in (broker_url, redis_url, addresses, spread, host_values)}
