"""Runners for the preprocessing stages: crop geometry, 3DMM alignment + regressor, the regressor alone."""
from __future__ import annotations

import numpy as np

from ..runtime import preprocess


def _regress(module, image: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return module(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))).numpy()


def run_crop_geometry(inputs: dict, entry: dict, ctx) -> dict:
    image = inputs["image"]
    box = preprocess.align_face_box(image.shape, inputs["landmarks"], xsize=int(entry["config"].get("xsize", 512)))
    face, ext_face = preprocess.crop_regions(image, box)
    return {
        "rsize": np.array(box.rsize, dtype=np.int64),
        "crop": np.array(box.crop, dtype=np.int64),
        "quad": np.array(box.quad, dtype=np.float64),
        "face": face,
        "ext_face": ext_face,
        "original_box": np.array(box.tight_box, dtype=np.int64),
    }


def run_first_frame_coeffs(inputs: dict, entry: dict, ctx) -> dict:
    trans_params, aligned = preprocess.align_for_3dmm(inputs["frame"], inputs["landmarks"])
    module = ctx.module("face3d_recon", entry["weights_seed"])
    raw = _regress(module, preprocess.regressor_input(aligned))
    return {"trans_params": trans_params, "aligned": aligned,
            "coeffs": preprocess.first_frame_coeffs(raw, trans_params)}


def run_face3d_recon(inputs: dict, entry: dict, ctx) -> dict:
    return {"coeffs": _regress(ctx.module("face3d_recon", entry["weights_seed"]), inputs["image"])}


RUNNERS = {
    "crop_geometry": run_crop_geometry,
    "first_frame_coeffs": run_first_frame_coeffs,
    "face3d_recon": run_face3d_recon,
}
