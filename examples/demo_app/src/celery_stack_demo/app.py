"""The Celery application object: ``celery -A celery_stack_demo.app``.

The app carries only its OWN settings (what the application decides: serializer, result
expiry, its task module). Where the broker and the result backend are, how tasks are routed to
queues and how reliable delivery is configured belong to the deployment: the celery_worker role
generates a config module and a wrapper that loads this app and then applies the stack's
settings on top (stack-managed keys win, everything else stays as set here).
"""

from celery import Celery

app = Celery("celery_stack_demo", include=["celery_stack_demo.tasks", "celery_stack_demo.features"])

app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    # Task results carry where they ran; the deployment may route them anywhere.
    task_track_started=True,
    # One periodic task, sent by celery beat (which the deployment runs on exactly one host).
    beat_schedule={
        "heartbeat": {"task": "celery_stack_demo.tasks.run_add", "schedule": 15.0, "args": (0, 0)},
    },
)
