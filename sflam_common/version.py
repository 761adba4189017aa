"""The installed sflam version, read once from the package metadata (pyproject.toml's
``version``): the CLI's ``--version``, a bundle's manifest and a device's Hello carry it."""

from __future__ import annotations

from importlib import metadata

UNKNOWN = "0+unknown"  # a source tree used without installing the package


def _installed_version() -> str:
    try:
        return metadata.version("sflam")
    except metadata.PackageNotFoundError:
        return UNKNOWN


__version__ = _installed_version()
