"""The HTTP side of the controller: the API by resource, its access rules and the dashboard."""

from .app import create_app
from .common import PREFIX

__all__ = ["PREFIX", "create_app"]
