"""Conformance runners for the audio side: features, ExpNet, Audio2Pose, smoothing and windows."""
from __future__ import annotations

import numpy as np

from ..runtime import audio_features as audio
from ..runtime import coeffs
from ..stages import SEMANTIC_RADIUS, is_full


def _torch_call(fn, *arrays: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return fn(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)).numpy()


def run_audio_features(inputs: dict, entry: dict, ctx) -> dict:
    mel, windows = audio.audio_features(inputs["wav"])
    return {"mel": mel, "indiv_mels": windows}


def run_audio2exp(inputs: dict, entry: dict, ctx) -> dict:
    model = ctx.module("audio2exp", entry["weights_seed"])
    return {"exp": _torch_call(model, inputs["indiv_mels"], inputs["ref"], inputs["ratio"])}


def run_audio2pose(inputs: dict, entry: dict, ctx) -> dict:
    model = ctx.module("audio2pose", entry["weights_seed"])
    pose_style = int(np.asarray(inputs["pose_style"]).reshape(-1)[0])

    def generate(mels, ref, noise):
        return model.generate(mels, ref, pose_style, noise)

    return {"pose": _torch_call(generate, inputs["indiv_mels"], inputs["ref"], inputs["noise"])}


def run_semantic_windows(inputs: dict, entry: dict, ctx) -> dict:
    config = entry.get("config", {})
    source, target = coeffs.semantic_windows(
        inputs["coeffs"], inputs["source_coeffs"],
        full=is_full(str(config.get("preprocess", "crop")).lower()),
        still=bool(config.get("still", False)),
        expression_scale=float(config.get("expression_scale", 1.0)),
        radius=int(config.get("semantic_radius", SEMANTIC_RADIUS)),
    )
    return {"source_semantics": source, "target_semantics": target}


def run_pose_smoothing(inputs: dict, entry: dict, ctx) -> dict:
    return {"smoothed": coeffs.smooth_pose(inputs["pose"])}


RUNNERS = {
    "audio_features": run_audio_features,
    "audio2exp": run_audio2exp,
    "audio2pose": run_audio2pose,
    "semantic_windows": run_semantic_windows,
    "pose_smoothing": run_pose_smoothing,
}
