"""Celery workers: a thin shell over realfake. `celery -A worker ...` finds the app here.

The app is made on first use (`worker.app`), not when the package is imported: making it
reads the REALFAKE_* settings, and `realfake-worker` reports a bad one as a message.
"""


def __getattr__(name: str):
    if name == "app":
        from worker.celery import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")


__all__ = ["app"]
