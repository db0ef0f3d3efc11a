"""Pool benchmark: why each queue has a prefork AND a threads worker.

Runs on a worker host with the stack's own app and configuration (celery_stack_app). For each
measurement only ONE pool's worker of the queue runs (the other is stopped for the duration),
the same batch of tasks is sent and the wall time until every result is back is taken:

  I/O-bound  crawl_and_store against a local page server that answers after a fixed delay
             (the original incident's crawl + database workload), queue `io`;
  CPU-bound  cpu_fib, pure Python computation, queue `cpu`.

Also (RabbitMQ) the publish rate with and without publisher confirms, which the deployment
turns on so that a broker crash loses no task.

Prints tasks per second per pool and the ratios. The workers are started again at the end.
Arguments (JSON): {"io_tasks": N, "io_delay": SECONDS, "cpu_tasks": N, "cpu_n": N,
                   "io_queue": NAME, "cpu_queue": NAME, "publish_messages": N}
"""

import http.server
import json
import socket
import subprocess
import sys
import threading
import time

from celery_stack_app import app
from kombu import Connection, Exchange, Queue

ARGS = json.loads(sys.argv[1])
HOST = socket.gethostname()
POOLS = ("prefork", "threads")


class SlowPage(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        time.sleep(ARGS["io_delay"])
        body = b"<html><head><title>benchmark page</title></head><body>ok</body></html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def only(queue, pool):
    """Leave exactly one worker on the queue: this host's worker of `pool`."""
    for other in POOLS:
        action = "start" if other == pool else "stop"
        subprocess.run(["systemctl", action, f"celery-worker@{queue}-{other}.service"], check=True)
    node = f"{queue}-{pool}@{HOST}"
    for _ in range(60):
        if app.control.ping(destination=[node], timeout=1.0):
            break
    else:
        raise SystemExit(f"{node} does not answer")
    consumers = app.control.inspect(timeout=2.0).active_queues() or {}
    others = sorted(n for n, qs in consumers.items() if n != node and any(q["name"] == queue for q in qs))
    if others:
        raise SystemExit(f"other workers consume queue {queue} too ({others}): run on a stack "
                         "with one worker host, e.g. the local stack")


def timed(name, args, queue, count):
    started = time.monotonic()
    results = [app.send_task(name, args=args, queue=queue) for _ in range(count)]
    for result in results:
        result.get(timeout=600)
    return time.monotonic() - started


def publish_rates(count):
    """Messages per second published as Celery publishes a task (persistent, to a durable queue),
    with and without publisher confirms, to a scratch queue of the routed queues' type that no
    worker consumes; deleted afterwards. What confirms (the deployment's setting: no task lost in
    a broker crash) cost a producer."""
    queue_type = (app.amqp.queues[ARGS["io_queue"]].queue_arguments or {}).get("x-queue-type", "classic")
    scratch = Queue("celery-stack-benchmark-publish", Exchange("celery-stack-benchmark-publish", type="direct"),
                    routing_key="celery-stack-benchmark-publish", durable=True,
                    queue_arguments={"x-queue-type": queue_type})
    body = {"task": "benchmark", "args": [0] * 8}
    rates = {}
    for confirm in (False, True):
        with Connection(app.conf.broker_url, ssl=app.conf.broker_use_ssl or False,
                        transport_options={"confirm_publish": confirm}) as connection:
            producer = connection.Producer()
            scratch(connection.default_channel).declare()
            producer.publish(body, exchange=scratch.exchange, routing_key=scratch.routing_key)  # warm-up
            started = time.monotonic()
            for _ in range(count):
                producer.publish(body, exchange=scratch.exchange, routing_key=scratch.routing_key,
                                 delivery_mode=2, serializer="json")
            rates["with confirms" if confirm else "without confirms"] = round(count / (time.monotonic() - started))
            scratch(connection.default_channel).delete()
            scratch.exchange(connection.default_channel).delete()
    return rates


def main():
    report = {}
    if app.conf.broker_url.startswith("amqp"):
        report["publish"] = publish_rates(ARGS["publish_messages"])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        for kind, queue, task, args, count in (
            ("io", ARGS["io_queue"], "celery_stack_demo.tasks.crawl_and_store", [url], ARGS["io_tasks"]),
            ("cpu", ARGS["cpu_queue"], "celery_stack_demo.tasks.cpu_fib", [ARGS["cpu_n"]], ARGS["cpu_tasks"]),
        ):
            for pool in POOLS:
                only(queue, pool)
                timed(task, args, queue, 2)  # warm-up: connections, imports, pool processes
                seconds = timed(task, args, queue, count)
                report[f"{kind}-{pool}"] = {"tasks": count, "seconds": round(seconds, 2),
                                            "tasks_per_second": round(count / seconds, 2)}
    finally:
        server.shutdown()
        subprocess.run(["systemctl", "start", "celery-workers.target"], check=False)
    io_ratio = report["io-threads"]["tasks_per_second"] / report["io-prefork"]["tasks_per_second"]
    cpu_ratio = report["cpu-prefork"]["tasks_per_second"] / report["cpu-threads"]["tasks_per_second"]
    report["ratios"] = {"io: threads / prefork": round(io_ratio, 2),
                        "cpu: prefork / threads": round(cpu_ratio, 2)}
    if "publish" in report:
        publish = report["publish"]
        report["ratios"]["publish: with / without confirms"] = round(
            publish["with confirms"] / publish["without confirms"], 2)
    print(json.dumps(report))


main()
