"""sadtalker-rt: deploy SadTalker (arXiv 2211.12194) as per-stage graphs and engines.

Importing this package loads only the standard library and numpy; torch, onnxruntime and
TensorRT are imported inside the functions that need them.
"""
__version__ = "0.1.0"
