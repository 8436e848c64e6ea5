"""Deterministic synthetic weights, used where the official checkpoints are absent.

Every value depends only on (seed, key name, shape), so any module whose state dict has the
official key names gets the same weights as the conformance recordings. The procedure matches
the one the conformance cases were recorded with: weights ~ N(0, 1/fan_in), 1-D weights near 1,
biases small, batch-norm statistics plausible, and spectral-norm triples made consistent so that
sigma = |W v| > 0.
"""
from __future__ import annotations

import zlib
from typing import Mapping, Sequence, Tuple

import numpy as np

Template = Mapping[str, Tuple[Sequence[int], str]]


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


def _fill(key: str, shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    if "int" in dtype:
        return np.zeros(shape, dtype=np.int64)
    rng = _rng(seed, key)
    if key.endswith("running_mean"):
        values = 0.1 * rng.standard_normal(shape)
    elif key.endswith("running_var"):
        values = rng.uniform(0.5, 1.5, size=shape)
    elif len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        values = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
    elif len(shape) == 1 and key.endswith("weight"):
        values = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
        values = 0.1 * rng.standard_normal(shape)
    return np.asarray(values, dtype=np.float32)


def synthetic_state_dict(template: Template, seed: int) -> dict[str, np.ndarray]:
    """Fill every key of ``template`` ({key: (shape, dtype)}) from ``seed``."""
    out = {k: _fill(k, tuple(int(d) for d in shape), str(dtype), seed) for k, (shape, dtype) in sorted(template.items())}
    for key in sorted(out):
        if not key.endswith("weight_orig"):
            continue
        base = key[: -len("orig")]
        if base + "u" not in out or base + "v" not in out:
            continue
        w = out[key].reshape(out[key].shape[0], -1).astype(np.float64)
        v = _rng(seed, base + "v").standard_normal(w.shape[1])
        v /= np.linalg.norm(v)
        u = w @ v
        u /= np.linalg.norm(u)
        out[base + "v"] = v.astype(np.float32)
        out[base + "u"] = u.astype(np.float32)
    return out
