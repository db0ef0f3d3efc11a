# Managed by Ansible (role celery_app of celery-stack): local changes are overwritten.
"""The application with the deployment's settings: ``celery -A celery_stack_app`` (the workers,
beat, the celery-stack command) or ``from celery_stack_app import app`` (a plain producer).

Loads the application module named in celery_stack_config.json the way ``celery -A`` does, then
applies celery_stack_config's settings on top (see that module for the layering rules).
"""

from celery.app.utils import find_app

import celery_stack_config

app = celery_stack_config.apply(find_app(celery_stack_config.APP_MODULE))
celery = app
