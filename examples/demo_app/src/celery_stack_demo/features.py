"""The feature suite's tasks (molecule/shared/faults/features.py): small building blocks for
Celery's canvas, control and result features, as an application would use them.

Not routed by a pattern of the demo's table, so they go to its default queue (io), on both of
its pools; a row that needs another queue names it when it sends.
"""

import time

from .app import app


@app.task
def add(x, y):
    return x + y


@app.task
def tsum(values):
    """A chord's body: the sum of its header's results."""
    return sum(values)


@app.task
def fail(message="failed on purpose"):
    raise ValueError(message)


@app.task(bind=True)
def grow_chord(self, n):
    """A chord header task that adds one more task (add(n, n)) to its own chord."""
    self.add_to_chord(add.s(n, n))
    return n


@app.task(bind=True)
def nap(self, seconds):
    """Waits, then says when it finished and where it ran (the pool is in the node name)."""
    time.sleep(float(seconds))
    return {"finished": time.time(), "hostname": self.request.hostname}


# Fails `failures` times, then succeeds; Celery retries it with exponential backoff (1, 2, 4 s:
# no jitter, so the waits are known).
@app.task(bind=True, autoretry_for=(ValueError,), retry_backoff=1, retry_jitter=False, max_retries=5)
def flaky(self, failures):
    if self.request.retries < int(failures):
        raise ValueError(f"attempt {self.request.retries + 1} fails on purpose")
    return {"retries": self.request.retries, "finished": time.time()}


@app.task
def record_error(task_id):
    """A link_error callback (Celery sends it the failed task's id): returns that id."""
    return task_id


@app.task(bind=True, rate_limit="12/m")
def limited(self):
    """At most 12 a minute (one per 5 s)... per worker instance: Celery's rate limit is a token
    bucket in each worker's consumer."""
    return {"finished": time.time(), "hostname": self.request.hostname}
