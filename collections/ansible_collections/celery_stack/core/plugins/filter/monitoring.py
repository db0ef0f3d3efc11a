# -*- coding: utf-8 -*-
"""What the monitoring host (roles/celery_monitoring) scrapes and where it sends alerts.

- ``promql_alternatives``: names as one PromQL regular expression (``io|cpu``), for a matcher
  such as ``queue=~"..."``; ``queue_matchers``: those of the routed queues and of their
  dead-letter queues;
- ``scrape_targets``: a Prometheus job's static_configs, one per host, labelled by its
  inventory name;
- ``alertmanager_config``: Alertmanager's configuration around the inventory's receiver.

Nothing here touches a host. Unit tests: tests/unit/plugins/filter/test_monitoring.py.
"""

from ansible_collections.celery_stack.core.plugins.module_utils.stack_description import DEAD_LETTER_SUFFIX

# Characters with a meaning in RE2 (Prometheus's regular expressions).
_RE2_SPECIAL = set("\\.+*?()|[]{}^$")
# The name of Alertmanager's one receiver: every alert goes there.
RECEIVER = "celery-stack"


def promql_alternatives(names):
    """`names` as one regular expression matching exactly them (Prometheus anchors a matcher's
    regular expression at both ends), escaped for RE2 and then for the double-quoted PromQL
    string it goes in. No names: one that matches nothing ("x^": an x before the start), not
    the empty string, which would match the series without the label."""
    escaped = ["".join("\\\\" + c if c in _RE2_SPECIAL else c for c in str(n)) for n in names]
    return "|".join(escaped) if escaped else "x^"


def queue_matchers(table):
    """{routed, dead_letter}: the regular expressions of the routing table's queues and of their
    dead-letter queues. The queue rules watch these only: not a client's reply queue, a pidbox or
    an event queue, which come and go with their clients."""
    names = [q["name"] for q in table]
    return {"routed": promql_alternatives(names),
            "dead_letter": promql_alternatives(n + DEAD_LETTER_SUFFIX for n in names)}


def scrape_targets(hosts, hostvars, port, port_variable=None):
    """One static_config per host: its celery_stack_address (default: its inventory name), the
    name its certificate carries, with the host's port (its port_variable when the inventory sets
    one, else `port`), and the label `instance` set to the host's inventory name, so that alerts
    name hosts, not addresses. Never 127.0.0.1, not even for the monitoring host itself: the
    exporters listen on the host's stack address only."""
    configs = []
    for host in hosts:
        address = hostvars[host].get("celery_stack_address") or host
        host_port = (hostvars[host].get(port_variable) if port_variable else None) or port
        configs.append({"targets": [f"{address}:{int(host_port)}"], "labels": {"instance": host}})
    return configs


def alertmanager_config(receiver, group_wait, group_interval, repeat_interval):
    """Alertmanager's configuration: every alert to the inventory's receiver (its webhook,
    e-mail or other *_configs), grouped by what names one problem (a queue, a host, a worker), so
    that one stuck queue is one message and two stuck queues are two."""
    return {
        "route": {
            "receiver": RECEIVER,
            "group_by": ["alertname", "vhost", "queue", "instance", "worker"],
            "group_wait": str(group_wait),
            "group_interval": str(group_interval),
            "repeat_interval": str(repeat_interval),
        },
        "receivers": [dict(receiver or {}, name=RECEIVER)],
    }


class FilterModule:
    def filters(self):
        return {f.__name__: f for f in (promql_alternatives, queue_matchers, scrape_targets, alertmanager_config)}
