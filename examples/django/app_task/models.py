from django.db import models


class Visit(models.Model):
    """A row written by the ``record_visit`` task: the database-writing, I/O-bound work."""

    label = models.CharField(max_length=100)
    created = models.DateTimeField(auto_now_add=True)
    # The Celery worker node that wrote the row (<queue>-<pool>@<host> on a deployed host).
    worker = models.CharField(max_length=200, blank=True)

    def __str__(self):
        return f"{self.label} by {self.worker or '?'} at {self.created:%Y-%m-%d %H:%M:%S}"
