"""Where the face enhancer's weights come from: ``GFPGANv1.4.pth`` and ``parsing_parsenet.pth`` as users
have them (SadTalker keeps both in ``gfpgan/weights`` beside ``checkpoints``), or synthetic weights.

Both end in ``checkpoints.build_subnetwork`` like every other sub-network. The parsing network is optional:
without it the paste-back uses the restore helper's feathered square mask.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .checkpoints import SUBNETWORKS, build_subnetwork, official_template, read_pickle
from ..errors import WeightsError

GFPGAN_KEYS = ("params_ema", "params")     # GFPGANer loads params_ema when present


class EnhancerWeights:
    """``location``: a folder holding the two files (or SadTalker's root / checkpoints folder), or the
    GFPGAN file itself (the parsing file is then looked for beside it)."""

    def __init__(self, location: Optional[Path] = None, synthetic_seed: Optional[int] = None):
        if (location is None) == (synthetic_seed is None):
            raise ValueError("give exactly one of location or synthetic_seed")
        self.location = Path(location) if location is not None else None
        self.synthetic_seed = synthetic_seed

    @property
    def synthetic(self) -> bool:
        return self.synthetic_seed is not None

    def _folders(self) -> list[Path]:
        base = self.location.parent if self.location.is_file() else self.location
        return [base, base / "gfpgan" / "weights", base.parent / "gfpgan" / "weights"]

    def path(self, name: str) -> Optional[Path]:
        filename = SUBNETWORKS[name].legacy_file
        if name == "gfpgan" and self.location.is_file():
            return self.location
        return next((f / filename for f in self._folders() if (f / filename).is_file()), None)

    def has(self, name: str) -> bool:
        return self.synthetic or self.path(name) is not None

    def state_dict(self, name: str) -> dict:
        if self.synthetic:
            from .synthetic import synthetic_state_dict

            return synthetic_state_dict(official_template(name), self.synthetic_seed)
        path = self.path(name)
        if path is None:
            raise WeightsError(f"{SUBNETWORKS[name].legacy_file} is not in {self.location} (nor in its gfpgan/weights "
                               "folder); download it from the GFPGAN / facexlib releases or use --synthetic-weights.")
        if path.stat().st_size == 0:
            raise WeightsError(f"{path} is empty.")
        if name == "gfpgan":
            try:
                return read_pickle(path, GFPGAN_KEYS)
            except WeightsError:
                if _is_parsenet_file(path):
                    raise WeightsError(f"{path} holds facexlib's face parsing network, not GFPGAN v1.4; "
                                       "pass GFPGANv1.4.pth.") from None
                raise
        try:
            return read_pickle(path, "")
        except WeightsError:
            if _holds_gfpgan(path):
                raise WeightsError(f"{path} holds GFPGAN weights, not the face parsing network; "
                                   "pass parsing_parsenet.pth.") from None
            raise

    def source_name(self, name: str) -> str:
        if self.synthetic:
            return f"synthetic weights for {name}"
        path = self.path(name)
        return f"{path} ['params_ema']" if name == "gfpgan" else str(path)

    def files(self) -> list[Path]:
        """The weight files read (none for synthetic weights): GFPGAN and, where present, the parsing network."""
        if self.synthetic:
            return []
        return [p for p in (self.path("gfpgan"), self.path("parsenet")) if p is not None]

    def describe(self) -> str:
        return (f"synthetic enhancer weights (seed {self.synthetic_seed})" if self.synthetic
                else f"GFPGAN weights from {self.location}")

    def identity(self) -> str:
        if self.synthetic:
            return f"synthetic-{self.synthetic_seed}"
        import hashlib

        digest = hashlib.sha256()
        for name in ("gfpgan", "parsenet"):
            path = self.path(name)
            if path is not None:
                digest.update(f"{path.name}:{path.stat().st_size}:{int(path.stat().st_mtime)}".encode())
        return "official-" + digest.hexdigest()[:16]

    def build(self, name: str):
        return build_subnetwork(name, self.state_dict(name), self.source_name(name))


def _holds_gfpgan(path: Path) -> bool:
    try:
        read_pickle(path, GFPGAN_KEYS)
    except WeightsError:
        return False
    return True


def _is_parsenet_file(path: Path) -> bool:
    """A whole-file state dict with ParseNet's keys (the two enhancer files are easily swapped)."""
    try:
        state = read_pickle(path, "")
    except WeightsError:
        return False
    return "out_mask_conv.conv2d.weight" in state
