"""The Celery application of the project: ``celery -A mysite``.

The app's OWN settings (serializers, result extension, the result backend and beat scheduler
it opts into) come from the Django settings, under the ``CELERY_`` namespace.

The DEPLOYMENT's settings (broker, result backend, task_routes/task_queues from the routing
table, acks_late, prefetch, ...) are applied on top by ``celery_stack_config.apply(app)``: it
calls ``app.conf.update()``, so its keys win over what ``config_from_object`` loaded.
``celery_stack_config`` is installed by the deployment on every worker host; it is not part of
this project. To run outside a deployed host, see README.md.
"""

import os

from celery import Celery

import celery_stack_config

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

app = Celery("mysite")
app.config_from_object("django.conf:settings", namespace="CELERY")
celery_stack_config.apply(app)  # the deployed routing, queues, broker, results and reliability settings
app.autodiscover_tasks()
