"""Where the weights come from: official files as users have them, or synthetic weights.

The official SadTalker release ships one safetensors file per render size holding five
sub-networks under key prefixes, two MappingNet pickles, and (for ``--old_version``) legacy
pickles. Every source ends in the same call, ``build_subnetwork(name, state_dict, source)``, so the
synthetic weights used by tests and demos travel the exact path of an official checkpoint.
"""
from __future__ import annotations

import hashlib
import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import WeightsError


@dataclass(frozen=True)
class SubNetwork:
    module: str              # python module with official_template / checkpoint_filter_fn / build
    prefix: str              # key prefix in SadTalker_V0.0.2_{size}.safetensors ("" if not there)
    legacy_file: str         # the --old_version (or mapping) pickle
    legacy_key: str          # entry of that pickle holding the state dict


SUBNETWORKS: dict[str, SubNetwork] = {
    "kp_extractor": SubNetwork("sadtalker_rt.models.kp_detector", "kp_extractor.", "facevid2vid_00189-model.pth.tar", "kp_detector"),
    "generator": SubNetwork("sadtalker_rt.models.generator", "generator.", "facevid2vid_00189-model.pth.tar", "generator"),
    "audio2exp": SubNetwork("sadtalker_rt.models.audio2exp", "audio2exp.", "auido2exp_00300-model.pth", "model"),
    "audio2pose": SubNetwork("sadtalker_rt.models.audio2pose", "audio2pose.", "auido2pose_00140-model.pth", "model"),
    "face_3drecon": SubNetwork("sadtalker_rt.models.face3d_recon", "face_3drecon.", "epoch_20.pth", "net_recon"),
    "mapping": SubNetwork("sadtalker_rt.models.mapping", "", "mapping_00229-model.pth.tar", "mapping"),
    "mapping_full": SubNetwork("sadtalker_rt.models.mapping", "", "mapping_00109-model.pth.tar", "mapping"),
    # The face enhancer's files live in SadTalker's gfpgan/weights folder (sadtalker_rt.enhancer_weights).
    "gfpgan": SubNetwork("sadtalker_rt.models.gfpgan", "", "GFPGANv1.4.pth", "params_ema"),
    "parsenet": SubNetwork("sadtalker_rt.models.parsenet", "", "parsing_parsenet.pth", ""),
}

# What WeightSource reads from the checkpoints folder; the enhancer's files are found by EnhancerWeights.
CHECKPOINT_SUBNETWORKS = tuple(name for name in SUBNETWORKS if name not in ("gfpgan", "parsenet"))

# Sub-network configuration that is not in the weights' shapes.
SUBNETWORK_CONFIG: dict[str, dict] = {"mapping": {"coeff_nc": 70}, "mapping_full": {"coeff_nc": 73}}


def safetensors_name(size: int) -> str:
    return f"SadTalker_V0.0.2_{size}.safetensors"


def subnetwork_module(name: str):
    return importlib.import_module(SUBNETWORKS[name].module)


def official_template(name: str) -> dict:
    return subnetwork_module(name).official_template(**SUBNETWORK_CONFIG.get(name, {}))


def build_subnetwork(name: str, state_dict: Mapping, source: str):
    """Official (unprefixed) state dict -> eval-mode torch module, refusing mismatches."""
    if name in MAPPING_MODES:
        check_mapping_channels(name, state_dict, source)
    return subnetwork_module(name).build(state_dict, source, **SUBNETWORK_CONFIG.get(name, {}))


# Which preprocess modes each MappingNet drives (sadtalker_rt.stages.mapping_stage).
MAPPING_MODES = {"mapping": "crop, extcrop and resize", "mapping_full": "full and extfull"}


def check_mapping_channels(name: str, state_dict: Mapping, source: str) -> None:
    """A MappingNet of the other preprocess family (70 vs 73 coefficients) gets its own sentence:
    the two mapping files have similar names and are easily swapped."""
    first = state_dict.get("first.0.weight")
    shape = tuple(getattr(first, "shape", ()))
    want = SUBNETWORK_CONFIG[name]["coeff_nc"]
    if len(shape) != 3 or shape[1] == want:
        return      # missing or malformed keys are reported by the strict loader
    other = next((n for n, cfg in SUBNETWORK_CONFIG.items() if cfg.get("coeff_nc") == shape[1]), None)
    held = (f"the MappingNet of the {MAPPING_MODES[other]} modes ({shape[1]} coefficients)" if other
            else f"a MappingNet for {shape[1]} coefficients")
    hint = (f"; {SUBNETWORKS['mapping'].legacy_file} and {SUBNETWORKS['mapping_full'].legacy_file} may have been "
            "swapped" if other else "")
    raise WeightsError(f"{source} holds {held}, but the {MAPPING_MODES[name]} modes need one for {want} "
                       f"coefficients{hint}.")


def select_prefix(state_dict: Mapping, prefix: str) -> dict:
    """Keys that start with ``prefix``, with the prefix removed (never a substring match)."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    odd = _unreadable_dtypes(path)
    if odd:    # decided from the header, so the answer does not depend on which numpy extensions are loaded
        raise WeightsError(f"{path} holds tensors of a type this toolkit cannot read ({', '.join(odd)}); "
                           "it is not a SadTalker checkpoint, whose tensors are float32.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path} is not a readable safetensors file ({_first_line(err)}).") from None
    except (TypeError, AttributeError) as err:   # bfloat16, float8 ...: dtypes numpy does not have
        raise WeightsError(f"{path} holds tensors of a type this toolkit cannot read ({_first_line(err)}); "
                           "it is not a SadTalker checkpoint, whose tensors are float32.") from None


READABLE_DTYPES = {"F16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "BOOL"}


def _unreadable_dtypes(path: Path) -> list[str]:
    """Tensor dtypes in a safetensors header that numpy has no type for (bfloat16, float8, ...)."""
    import json
    import struct

    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 << 20:
                return []
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return []          # the loader reports damaged files
    if not isinstance(header, dict):
        return []
    return sorted({v.get("dtype") for k, v in header.items() if isinstance(v, dict) and k != "__metadata__"}
                  - READABLE_DTYPES - {None})


ZIP_MAGIC = b"PK"           # torch.save since 1.6
PICKLE_MAGIC = b"\x80"      # legacy torch.save and plain pickles (protocol 2 and later)


def read_pickle(path: Path, key: str | tuple[str, ...]) -> dict:
    """A torch pickle read with ``weights_only=True``; returns ``checkpoint[key]``, a dict of tensors.

    ``key`` may list alternatives (the first present wins) or be "" for a file that is the state dict."""
    import pickle
    import warnings
    import zipfile

    import torch

    try:
        with open(path, "rb") as handle:
            magic = handle.read(2)
    except OSError as err:
        raise WeightsError(f"{path} cannot be read ({_first_line(err)}).") from None
    if not (magic.startswith(ZIP_MAGIC) or magic.startswith(PICKLE_MAGIC)):
        raise WeightsError(f"{path} is not a PyTorch checkpoint (it is neither a zip archive nor a pickle).")
    try:
        with warnings.catch_warnings():     # e.g. "Detected pickle protocol 4": one error line, not a warning
            warnings.simplefilter("ignore")
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(f"{path} holds objects other than tensors ({_unpickler_reason(err)}); the weights-only "
                           "loader refused it unread, as it never runs code from a checkpoint.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise WeightsError(f"{path} is truncated or damaged; it could not be read as a PyTorch checkpoint "
                           f"({_first_line(err).split('. ')[0].rstrip('.')}).") from None
    keys = (key,) if isinstance(key, str) else tuple(key)
    if keys == ("",):
        if not isinstance(checkpoint, Mapping):
            raise WeightsError(f"{path} holds a {type(checkpoint).__name__}, not a state dict; is it the right file?")
        return _tensor_dict(path, checkpoint, "")
    key = next((k for k in keys if isinstance(checkpoint, dict) and k in checkpoint), keys[0])
    if not isinstance(checkpoint, dict) or key not in checkpoint:
        found = sorted(map(str, checkpoint))[:6] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        wanted = "' or '".join(keys)
        raise WeightsError(f"{path} has no '{wanted}' entry (found {found}); is it the right file?")
    return _tensor_dict(path, checkpoint[key], key)


def _tensor_dict(path: Path, state, key: str) -> dict:
    import torch

    where = f"{path} ['{key}']" if key else str(path)
    if not isinstance(state, Mapping):
        raise WeightsError(f"{where} is a {type(state).__name__}, not a state dict; is it the right file?")
    odd = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise WeightsError(f"{where} holds a {type(state[odd]).__name__} under '{odd}' where a tensor "
                           "belongs; is it the right file?")
    return dict(state)


def _unpickler_reason(err: BaseException) -> str:
    """The useful part of torch's weights-only refusal: what it met, without the advice to unpickle anyway."""
    text = _strip_ansi(str(err))
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if match:
        return match.group(1).strip().split(". ")[0][:160]
    return _first_line(err)


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _first_line(err: BaseException) -> str:
    text = _strip_ansi(str(err)).strip().splitlines()
    return text[0].strip()[:200] if text else type(err).__name__


class WeightSource:
    """Official files in a directory, or synthetic weights from a seed.

    ``state_dict(name)`` returns the official, unprefixed state dict of one sub-network.
    """

    def __init__(self, checkpoints: Path | None = None, synthetic_seed: int | None = None, size: int = 256,
                 old_version: bool = False):
        if (checkpoints is None) == (synthetic_seed is None):
            raise ValueError("give exactly one of checkpoints or synthetic_seed")
        self.checkpoints = Path(checkpoints) if checkpoints is not None else None
        self.synthetic_seed = synthetic_seed
        self.size = size
        self.old_version = old_version
        self._safetensors: dict | None = None

    @property
    def synthetic(self) -> bool:
        return self.synthetic_seed is not None

    def describe(self) -> str:
        if self.synthetic:
            return f"synthetic weights (seed {self.synthetic_seed}); the output shows no real face motion"
        return f"official checkpoints in {self.checkpoints}"

    def identity(self) -> str:
        """A short hash of what the weights are, for manifests and caches."""
        if self.synthetic:
            return f"synthetic-{self.synthetic_seed}"
        digest = hashlib.sha256()
        for name in sorted(self._files()):
            path = self.checkpoints / name
            digest.update(f"{name}:{path.stat().st_size}:{int(path.stat().st_mtime)}".encode())
        return "official-" + digest.hexdigest()[:16]

    def files(self) -> list[Path]:
        """The checkpoint files these weights are read from (none for synthetic weights)."""
        return [] if self.synthetic else [self.checkpoints / name for name in sorted(self._files())]

    def _files(self) -> list[str]:
        names = {SUBNETWORKS["mapping"].legacy_file, SUBNETWORKS["mapping_full"].legacy_file}
        if self.old_version:
            names |= {SUBNETWORKS[n].legacy_file for n in CHECKPOINT_SUBNETWORKS}
        else:
            names.add(safetensors_name(self.size))
        return sorted(n for n in names if (self.checkpoints / n).exists())

    def _path(self, name: str) -> Path:
        path = self.checkpoints / name
        if not path.is_file():
            raise WeightsError(f"{path} is missing; download the official SadTalker checkpoints into "
                               f"{self.checkpoints} or use --synthetic-weights.")
        if path.stat().st_size == 0:
            raise WeightsError(f"{path} is empty.")
        return path

    def state_dict(self, name: str) -> dict:
        spec = SUBNETWORKS[name]
        if self.synthetic:
            from .synthetic import synthetic_state_dict

            return synthetic_state_dict(official_template(name), self.synthetic_seed)
        if spec.prefix and not self.old_version:
            if self._safetensors is None:
                self._safetensors = read_safetensors(self._path(safetensors_name(self.size)))
            selected = select_prefix(self._safetensors, spec.prefix)
            if not selected:
                raise WeightsError(f"{self.checkpoints / safetensors_name(self.size)} has no '{spec.prefix}*' keys; "
                                   "it is not a SadTalker checkpoint.")
            return selected
        return read_pickle(self._path(spec.legacy_file), spec.legacy_key)

    def source_name(self, name: str) -> str:
        spec = SUBNETWORKS[name]
        if self.synthetic:
            return f"synthetic weights for {name}"
        if spec.prefix and not self.old_version:
            return f"{self.checkpoints / safetensors_name(self.size)} ['{spec.prefix}*']"
        return f"{self.checkpoints / spec.legacy_file} ['{spec.legacy_key}']"

    def build(self, name: str):
        return build_subnetwork(name, self.state_dict(name), self.source_name(name))
