"""The example app: routed Celery tasks and the Visit rows the I/O task writes."""
