import json

from django.core.management.base import BaseCommand

from app_task.models import Visit


class Command(BaseCommand):
    help = "Print how many Visit rows LABEL has and which workers wrote them."

    def add_arguments(self, parser):
        parser.add_argument("label")

    def handle(self, *args, **options):
        label = options["label"]
        visits = Visit.objects.filter(label=label)
        workers = sorted(set(visits.values_list("worker", flat=True)))
        self.stdout.write(json.dumps({"label": label, "count": visits.count(), "workers": workers}))
