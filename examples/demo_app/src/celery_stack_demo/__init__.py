"""Demo Celery application deployed by the celery_worker role (see README.md)."""
