"""Django settings for mysite, the celery-stack example project.

Everything deployment-specific comes from the environment (on deployed hosts the workers and
beat read it from the deployment's EnvironmentFile); nothing secret is kept in this file.
README.md lists the variables.
"""

import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def _env_bool(name, default=False):
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _env_list(name, default):
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


# Required: a missing key must stop the process, not fall back to a known value.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY is not set: export it (on deployed hosts the deployment writes it to "
        "its EnvironmentFile)"
    )

DEBUG = _env_bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = _env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1")

# No contrib apps: neither django_celery_beat's nor django_celery_results' models or migrations
# depend on them. Add django.contrib.admin (with auth, contenttypes, sessions, messages and their
# middleware and templates) to edit periodic tasks and results in the admin.
INSTALLED_APPS = [
    "django_celery_beat",
    "django_celery_results",
    "app_task",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "mysite.urls"
WSGI_APPLICATION = "mysite.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("MYSITE_DATABASE_HOST", ""),
        "PORT": os.environ.get("MYSITE_DATABASE_PORT", "5432"),
        "NAME": os.environ.get("MYSITE_DATABASE_NAME", ""),
        "USER": os.environ.get("MYSITE_DATABASE_USER", ""),
        "PASSWORD": os.environ.get("MYSITE_DATABASE_PASSWORD", ""),
        # A new connection per request on the web side. In the workers it matters little:
        # Celery's Django fixup closes the database connections before and after every task
        # anyway (unless CELERY_DB_REUSE_MAX is set).
        "CONN_MAX_AGE": 0,
    }
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
USE_I18N = False
# Aware datetimes everywhere; django_celery_beat and django_celery_results store them in UTC.
USE_TZ = True
TIME_ZONE = "UTC"

# ---------------------------------------------------------------------------------------------
# Celery: the application's OWN settings (mysite/celery.py loads them with namespace="CELERY").
# The deployment applies its settings on top (celery_stack_config.apply: broker, result backend,
# routing, queues, reliability), and those win over the values here.
# ---------------------------------------------------------------------------------------------

CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
# Refuse pickle and every other content type: only JSON messages are deserialized.
CELERY_ACCEPT_CONTENT = ["json"]
# Store task name, args, worker and queue with each result (django-celery-results then fills
# its task_name and worker columns).
CELERY_RESULT_EXTENDED = True
# Beat computes schedules in this zone; keep it equal to TIME_ZONE.
CELERY_TIMEZONE = TIME_ZONE

# Results in PostgreSQL (django_celery_results' table) with MYSITE_RESULTS=django-db, for a
# deployment that leaves the result backend to the application (celery_stack_result_backend:
# app). A deployment with its own result backend (e.g. Redis) sets it in
# celery_stack_config.apply(app), which wins over this one.
if os.environ.get("MYSITE_RESULTS") == "django-db":
    CELERY_RESULT_BACKEND = "django-db"

# Periodic tasks from the database (editable at run time, e.g. by `schedule_visit`) with
# MYSITE_BEAT_SCHEDULER=database; otherwise Celery's default file-based scheduler.
if os.environ.get("MYSITE_BEAT_SCHEDULER") == "database":
    CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
