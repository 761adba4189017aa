"""Runtimes that execute a bundle's device graphs: LiteRT, ONNX Runtime, and a numpy reference.

Every backend implements :class:`edge_runtime.backends.base.Backend`; none imports torch.
"""
