"""sflam: split federated fine-tuning of Vision Transformers across edge devices."""

from sflam_common.version import __version__

__all__ = ["__version__"]
