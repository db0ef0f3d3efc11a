import json

from django.core.management.base import BaseCommand, CommandError
from django_celery_beat.models import IntervalSchedule, PeriodicTask


class Command(BaseCommand):
    help = (
        "Create or update the periodic task record-visit-LABEL: app_task.tasks.record_visit(LABEL) "
        "every SECONDS (django-celery-beat; beat must run with the DatabaseScheduler)."
    )

    def add_arguments(self, parser):
        parser.add_argument("label")
        parser.add_argument("--every", type=int, required=True, metavar="SECONDS")

    def handle(self, *args, **options):
        label, every = options["label"], options["every"]
        if every < 1:
            raise CommandError("--every must be at least 1 second")
        # IntervalSchedule has no unique constraint: reuse the first matching row, if any.
        schedule = (
            IntervalSchedule.objects.filter(every=every, period=IntervalSchedule.SECONDS)
            .order_by("id")
            .first()
        ) or IntervalSchedule.objects.create(every=every, period=IntervalSchedule.SECONDS)
        name = f"record-visit-{label}"
        # Idempotent: running it again updates the one task of that name. No queue/exchange/
        # routing_key on the task: the deployment's routing table routes it by its name.
        PeriodicTask.objects.update_or_create(
            name=name,
            defaults={
                "interval": schedule,
                "crontab": None,
                "solar": None,
                "clocked": None,
                "task": "app_task.tasks.record_visit",
                "args": json.dumps([label]),
                "enabled": True,
                "one_off": False,
            },
        )
        self.stdout.write(json.dumps({"periodic_task": name, "every": every}))
