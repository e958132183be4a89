"""realfake: train and serve real-vs-fake face classifiers.

The domain library. Plain typed functions; nothing here imports Celery.
"""

import warnings

from PIL import Image

__version__ = "0.1.0"

# An image over PIL's pixel limit is refused, never decoded (decompression bombs): set here,
# where every process that opens an image through realfake passes first.
warnings.simplefilter("error", Image.DecompressionBombWarning)
