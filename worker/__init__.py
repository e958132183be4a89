"""Celery workers: a thin shell over realfake. `celery -A worker ...` finds the app here."""

from worker.celery import app

__all__ = ["app"]
