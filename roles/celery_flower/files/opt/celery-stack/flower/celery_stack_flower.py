# Managed by Ansible (role celery_flower of celery-stack): local changes are overwritten.
"""Flower for the celery-stack deployment: ``python celery_stack_flower.py [flower options]``.

Flower needs a Celery app to connect with. This one is built from the deployment's settings
alone (celery_stack_config, on PYTHONPATH: the broker and result backend URLs, the routed
queues), never by importing the application: the application's code and dependencies are not
in Flower's venv, and a monitor should not run the application's import-time code anyway.
Flower only consumes events and broadcasts inspect commands, for which the settings suffice.

Before Flower starts, its /metrics page is put behind the same authentication as every other
page (see protect_metrics). Options come from the command line; the basic auth from the
environment (FLOWER_BASIC_AUTH, set by systemd from an EnvironmentFile), never the command line.
"""

import sys

import tornado.web
from celery import Celery
from flower.views import monitor

import celery_stack_config


def protect_metrics():
    """Flower 2.x serves /metrics (flower.views.monitor.Metrics) without @web.authenticated,
    unlike every other page and the whole API: with basic auth on, an anonymous client still
    reads the Prometheus metrics, which name every worker, host and task of the deployment and
    how they fare. Wrap its handler like the others, so /metrics needs the ops users' basic auth
    too (Prometheus scrapes with basic_auth). /healthcheck stays open: it only says OK.

    Should a Flower release move or rename the handler, the import above fails and Flower does
    not start: the deployment fails closed instead of serving the metrics to anyone."""
    get = monitor.Metrics.get
    if not getattr(get, "celery_stack_authenticated", False):
        get = tornado.web.authenticated(get)
        get.celery_stack_authenticated = True
        monitor.Metrics.get = get


def main(argv):
    protect_metrics()
    app = celery_stack_config.apply(Celery("celery-stack"))
    # `celery flower` with this app: Flower's own command (option parsing, FLOWER_* environment,
    # logging, SIGTERM handling), run by Celery's command line as `celery -A` would.
    return app.start(["flower", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
