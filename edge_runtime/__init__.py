"""What runs on a device: protocol, quantizer, backends, energy meters, the MQTT device loop.

This package must never import torch, ``server_runtime``, ``export`` or ``sflam``: it is what
gets installed on a phone, a Jetson or a Raspberry Pi.
"""
