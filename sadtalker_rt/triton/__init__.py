"""Serving on NVIDIA Triton Inference Server: a model repository made from the stage table and an export
(``repository``), the Python-backend models of that repository (``models``), a client (``client``), a launcher
for a local ``tritonserver`` (``server``) and a concurrency benchmark (``bench``)."""
