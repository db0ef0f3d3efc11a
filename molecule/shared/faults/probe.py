"""The fault suite's client: runs on a producer host with the deployment's own app and settings.

Sends a burst of crawl_probe tasks the way the application does (``.delay()``, routed to queue
io), then reads every result back with ``AsyncResult.get()``, in order, each call waiting as long
as the run's deadline allows (a client that trusts get() to return once the result exists). One
JSON line on stdout at the end; progress lines before it ("started <unix time>", "sent <unix
time>") tell the orchestrator (faults.py) when to strike.

Argument (JSON): {"run": ID, "tasks": N, "seconds": TASK_SECONDS, "spread": SECONDS_TO_SEND_OVER,
                  "wait": SECONDS_AFTER_SENDING}
"""

import json
import sys
import time
from collections import Counter

from celery.exceptions import TimeoutError as ResultTimeout
from celery.states import READY_STATES
from celery.result import AsyncResult
from celery_stack_app import app
from celery_stack_demo.tasks import crawl_probe

ARGS = json.loads(sys.argv[1])


def say(line):
    print(line, flush=True)


def send():
    """Publish the burst (spread over ARGS["spread"] seconds); a publish that raises is counted,
    not retried: the application would have seen the error."""
    ids, refused = [], []
    started = time.time()
    for index in range(ARGS["tasks"]):
        if ARGS["spread"]:
            time.sleep(max(0.0, started + ARGS["spread"] * index / ARGS["tasks"] - time.time()))
        try:
            ids.append(crawl_probe.delay(ARGS["run"], index, ARGS["seconds"]).id)
        except Exception as error:  # noqa: BLE001 (any publish error counts)
            ids.append(None)
            refused.append(repr(error)[:200])
    return ids, refused


def collect(ids, deadline):
    """get() every result in order. Returns the time at which each call ended (returned, or gave
    up at the deadline), the errors the calls raised, and the tasks whose get() gave up at the
    deadline although their result was stored by then (a fresh read right after): get() missed
    the result's notification and would have waited as long as its timeout allowed."""
    ended, errors, missed = [], [], []
    for index, task_id in enumerate(ids):
        if task_id is None:
            continue
        result = AsyncResult(task_id, app=app)
        while time.time() < deadline:
            try:
                result.get(timeout=deadline - time.time(), propagate=False, interval=0.2)
                break
            except ResultTimeout:
                if AsyncResult(task_id, app=app).state in READY_STATES:
                    missed.append(index)
                break
            except Exception as error:  # noqa: BLE001 (a client sees it: count it, try again)
                errors.append(repr(error)[:200])
                time.sleep(0.5)
        ended.append(round(time.time(), 3))
    return ended, errors, missed


def main():
    say(f"started {time.time():.3f}")
    ids, refused = send()
    sent_at = time.time()
    say(f"sent {sent_at:.3f}")
    ended, errors, missed = collect(ids, sent_at + ARGS["wait"])
    states = {}
    for index, task_id in enumerate(ids):
        if task_id is not None:
            # A fresh read of the stored state (the result store is back by now).
            states[index] = AsyncResult(task_id, app=app).state
    say(json.dumps({
        "sent": len(ids) - len(refused),
        "refused": len(refused),
        "refused_errors": Counter(refused).most_common(3),
        "states": states,
        "get_ended": ended,
        "get_errors": len(errors),
        "get_missed": missed,
        "get_error_kinds": Counter(errors).most_common(3),
        "sent_at": sent_at,
    }))


if __name__ == "__main__":
    main()
