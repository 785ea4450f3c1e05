"""The flux command-line interface: a thin front end over the controller's HTTP API."""

from importlib import metadata

try:  # the installed distribution's (pyproject.toml's, or the package's)
    __version__ = metadata.version("flux-fleet")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+source"
