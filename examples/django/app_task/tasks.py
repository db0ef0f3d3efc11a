"""The project's tasks.

Their names are the default module paths (``app_task.tasks.run_add``,
``app_task.tasks.record_visit``): the deployment's routing table routes them by name, so do not
give them custom names. Each returns the worker node and the queue it was delivered from, so a
caller can see where the routing sent it.
"""

from celery import shared_task

from .models import Visit


def _where(request):
    return {
        "hostname": request.hostname,
        "queue": (request.delivery_info or {}).get("routing_key"),
    }


@shared_task(bind=True)
def run_add(self, x, y):
    """Add two numbers (the original note's example task; CPU-bound in spirit)."""
    return {"result": x + y, **_where(self.request)}


@shared_task(bind=True)
def record_visit(self, label):
    """Write one Visit row: the database-writing, I/O-bound task."""
    visit = Visit.objects.create(label=label, worker=self.request.hostname or "")
    return {"id": visit.id, "label": label, **_where(self.request)}
