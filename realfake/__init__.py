"""realfake: train and serve real-vs-fake face classifiers.

The domain library. Plain typed functions; nothing here imports Celery.
"""

__version__ = "0.1.0"
