import json

from django.core.management.base import BaseCommand

from app_task.tasks import run_add


class Command(BaseCommand):
    help = "Send app_task.tasks.run_add(X, Y); print its task id (and its result with --wait)."

    def add_arguments(self, parser):
        parser.add_argument("x", type=int)
        parser.add_argument("y", type=int)
        parser.add_argument(
            "--wait",
            type=float,
            metavar="SECONDS",
            help="wait up to SECONDS for the result (needs a result backend)",
        )

    def handle(self, *args, **options):
        result = run_add.delay(options["x"], options["y"])
        if options["wait"] is None:
            self.stdout.write(json.dumps({"task_id": result.id}))
            return
        value = result.get(timeout=options["wait"])
        self.stdout.write(json.dumps({"task_id": result.id, "result": value}))
