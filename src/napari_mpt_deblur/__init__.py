"""napari-mpt-deblur: defocus deblurring for microscopy with the Multi-Pyramid Transformer.

The library (models, losses, data, training, inference, evaluation, io) never imports napari or
Qt; the napari widgets in ``_widget*.py`` only wire it together. Importing this package is cheap:
torch and TensorFlow are imported only by the modules that need them.
"""

from ._version import __version__

__all__ = ["__version__"]
