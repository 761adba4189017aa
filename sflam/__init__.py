"""sflam: split federated fine-tuning of Vision Transformers across edge devices."""

__version__ = "0.1.0"
