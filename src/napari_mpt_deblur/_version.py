"""Package version, from the installed metadata when there is one."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-mpt-deblur")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0.dev0"
