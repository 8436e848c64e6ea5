"""The baseline: float32 eager PyTorch as the official inference loop runs it (the hidden fourth backend made
explicit): every stage from the torch backend, the renderer replaced by the whole generator per call."""
from __future__ import annotations

import numpy as np

from ..runtime.backends import SerialBackend
from ..stages import STAGES



class OfficialRenderer:
    """The official loop's renderer call: the whole generator, the source image batch-expanded and re-encoded
    on every call (``OcclusionAwareSPADEGenerator.forward``). Takes the renderer stage's feeds and ignores the
    cached features in them."""

    def __init__(self, generator, backend: "OfficialBackend"):
        self.stage = STAGES["renderer"]
        self.generator = generator
        self.backend = backend

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from ..runtime.backends import check_feeds

        check_feeds(self.stage, feeds)
        if self.backend.source_image is None:
            raise RuntimeError("the official renderer needs the source image; run kp_detector first")
        device = self.backend.device
        kp_driving = torch.from_numpy(np.ascontiguousarray(feeds["kp_driving"])).to(device)
        kp_source = torch.from_numpy(np.ascontiguousarray(feeds["kp_source"])).to(device)
        image = torch.from_numpy(np.ascontiguousarray(self.backend.source_image)).to(device)
        batch = kp_driving.shape[0]
        with torch.inference_mode():
            out = self.generator(image.expand(batch, -1, -1, -1), kp_source.expand(batch, -1, -1), kp_driving)
        return {"frames": out["prediction"].float().cpu().numpy()}


class _SourceTap:
    """Passes a stage through and remembers the source image fed to it."""

    def __init__(self, inner, backend: "OfficialBackend"):
        self.inner = inner
        self.stage = inner.stage
        self.backend = backend

    def infer(self, feeds):
        self.backend.source_image = np.asarray(feeds["source_image"])
        return self.inner.infer(feeds)


class OfficialBackend(SerialBackend):
    """Float32 eager PyTorch as the official inference loop runs it: every stage from the torch backend, the
    renderer replaced by the whole generator per call."""

    name = "official"

    def __init__(self, torch_backend):
        self.torch = torch_backend
        self.size = torch_backend.size
        self.device = torch_backend.device
        self.source_image: np.ndarray | None = None
        self._renderer = None

    def runner(self, stage: str):
        if stage == "renderer":
            if self._renderer is None:
                generator = self.torch.subnetwork("generator").to(self.device).eval()
                self._renderer = OfficialRenderer(generator, self)
            return self._renderer
        inner = self.torch.runner(stage)
        return _SourceTap(inner, self) if stage == "kp_detector" else inner
