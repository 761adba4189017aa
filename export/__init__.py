"""torch -> ONNX / TFLite / TFLite Micro device artifacts, verification and bundles."""
