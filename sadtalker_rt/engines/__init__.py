"""TensorRT engines: planning and cache keys (``plan``), building (``build``), the CUDA pieces (``cuda``)
and the per-frame scheduler that overlaps mapping, rendering and copies (``scheduler``).

Only ``build`` and ``cuda`` import TensorRT or cuda-python, inside their functions; ``plan`` and
``scheduler`` are pure Python and numpy, so everything that decides what to build, whether an engine
may run and in which order work is issued is tested without a GPU.
"""
