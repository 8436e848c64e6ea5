"""Strict loading of official state dicts into the reference modules."""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import WeightsError


def to_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    # NOTE: ascontiguousarray makes 0-d arrays 1-d; keep num_batches_tracked 0-d.
    return torch.from_numpy(np.ascontiguousarray(array).reshape(array.shape))


def fold_spectral_norm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each (weight_orig, weight_u, weight_v) triple by the plain weight W_orig / sigma.

    In eval mode the official spectral norm does no power iteration: sigma = u . (W_mat v) with
    the stored u and v, computed in the weight's dtype as torch does.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(("weight_u", "weight_v")) and key[:-1] + "orig" in state_dict:
            continue
        if key.endswith("weight_orig"):
            base = key[: -len("_orig")]
            u, v = state_dict.get(base + "_u"), state_dict.get(base + "_v")
            if u is None or v is None:
                out[key] = value
                continue
            w = to_tensor(value).float()
            sigma = torch.dot(to_tensor(u).float(), torch.mv(w.reshape(w.shape[0], -1), to_tensor(v).float()))
            out[base] = w / sigma
        else:
            out[key] = to_tensor(value)
    return out


def expand_spectral_norm(template: dict[str, tuple[tuple[int, ...], str]], conv_weights: Iterable[str]) -> dict:
    """The official key layout of spectral-normed convs: weight -> weight_orig, weight_u, weight_v."""
    out = dict(template)
    for key in conv_weights:
        shape, dtype = out.pop(key)
        out[key + "_orig"] = (shape, dtype)
        out[key + "_u"] = ((shape[0],), dtype)
        out[key + "_v"] = ((int(np.prod(shape[1:])),), dtype)
    return dict(sorted(out.items()))


def module_template(module: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in module.state_dict().items()}


def _preview(keys: Iterable[str], limit: int = 4) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """Load exactly the module's keys; refuse with one sentence naming the file and the keys."""
    expected = module.state_dict()
    # Batch-norm step counters do nothing in eval; a file saved without them is still complete.
    state_dict = {**{k: torch.zeros((), dtype=torch.long) for k in expected
                     if k.endswith("num_batches_tracked") and k not in state_dict}, **state_dict}
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys ({_preview(missing)})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys ({_preview(unexpected)})")
    if not problems:
        wrong = [k for k, v in state_dict.items() if tuple(v.shape) != tuple(expected[k].shape)]
        if wrong:
            k = wrong[0]
            problems.append(
                f"{len(wrong)} keys of the wrong shape ({k} is {tuple(state_dict[k].shape)}, "
                f"expected {tuple(expected[k].shape)})"
            )
    if problems:
        raise WeightsError(f"{source} does not match {type(module).__name__}: " + "; ".join(problems) + ".")
    cast = {k: to_tensor(v).to(expected[k].dtype) for k, v in state_dict.items()}
    module.load_state_dict(cast, strict=True)
    return module.eval()


def load_on_meta(make: Callable[[], nn.Module], state_dict: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """``make()`` on the meta device (no random initialisation to throw away), then filled by ``load_strict``."""
    with torch.device("meta"):
        module = make()
    return load_strict(module.to_empty(device="cpu"), state_dict, source)
