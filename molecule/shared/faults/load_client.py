"""The load suite's client (load.py): runs on a producer host with the deployment's own app and
settings, in one of two modes, one JSON line on stdout each.

  send   {"run": ID, "task": NAME, "seconds": S, "tasks": N, "producers": P, "rate": R}
         P processes publish tasks 0..N-1 (task id "<run>-<index>", args (run, index, S)) as the
         application would: app.send_task through the routing table, publisher confirms as the
         settings say. One process publishes at ~150-270 tasks/s with confirms, so a burst uses
         several to measure the workers, not the producer. R > 0: a steady R tasks/s in all
         (a soak) instead of as fast as possible. Prints the send time of every index.
  states {"run": ID, "tasks": N}
         one read of every task's stored state (the result backend's mget in chunks where it
         has one: thousands of sequential AsyncResult round trips would take longer than the
         burst), and the indexes without a final state.
"""

import json
import multiprocessing
import sys
import time

ARGS = json.loads(sys.argv[2])
FINAL = ("SUCCESS", "FAILURE", "REVOKED")


def publish(producer):
    """Publish this producer's share (every P-th index). The app is imported here, in the
    forked process, so that each producer has its own broker connection."""
    from celery_stack_app import app

    share = range(producer, ARGS["tasks"], ARGS["producers"])
    rate = ARGS["rate"] / ARGS["producers"] if ARGS["rate"] else 0
    sent, errors, started = {}, [], time.time()
    for n, index in enumerate(share):
        if rate:
            time.sleep(max(0.0, started + n / rate - time.time()))
        at = time.time()
        try:
            app.send_task(ARGS["task"], args=(ARGS["run"], index, ARGS["seconds"]), task_id=f"{ARGS['run']}-{index}")
            sent[index] = round(at, 4)
        except Exception as error:  # noqa: BLE001 (the application would have seen it: count it)
            errors.append(repr(error)[:200])
    elapsed = time.time() - started
    return sent, errors, len(sent) / elapsed if elapsed > 0 else 0.0


def send():
    with multiprocessing.get_context("fork").Pool(ARGS["producers"]) as pool:
        shares = pool.map(publish, range(ARGS["producers"]))
    sent = {index: at for share, _, _ in shares for index, at in share.items()}
    errors = [error for _, share_errors, _ in shares for error in share_errors]
    span = max(sent.values()) - min(sent.values()) if len(sent) > 1 else 0.0
    return {"sent": sent, "refused": len(errors), "refused_errors": sorted(set(errors))[:3],
            "publish_rate": len(sent) / span if span else 0.0,
            "producer_rate": sum(rate for _, _, rate in shares) / len(shares)}


def states():
    from celery.result import AsyncResult
    from celery_stack_app import app

    ids = [f"{ARGS['run']}-{index}" for index in range(ARGS["tasks"])]
    backend, found = app.backend, {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start:start + 1000]
        if hasattr(backend, "mget"):  # key-value backends (Redis)
            values = backend.mget([backend.get_key_for_task(task_id) for task_id in chunk])
            found.update({task_id: backend.decode_result(value)["status"] if value else "PENDING"
                          for task_id, value in zip(chunk, values)})
        else:
            found.update({task_id: AsyncResult(task_id, app=app).state for task_id in chunk})
    counts = {}
    for state in found.values():
        counts[state] = counts.get(state, 0) + 1
    return {"states": counts, "not_final": [i for i, task_id in enumerate(ids) if found[task_id] not in FINAL]}


if __name__ == "__main__":
    print(json.dumps({"send": send, "states": states}[sys.argv[1]]()), flush=True)
