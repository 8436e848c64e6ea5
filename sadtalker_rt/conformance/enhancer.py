"""Conformance runners for the face enhancer: GFPGAN, ParseNet, the restore helper's geometry and paste, GFPGANer."""
from __future__ import annotations

import numpy as np

from ..runtime import face_restore as fr

# Offsets of ParseNet's logits kept by the recordings: pixels 4, 12, ..., 508 of each axis.
LOGITS_SUB = slice(4, None, 8)


def _infer(module, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()


def _restore(gfpgan, faces: list) -> tuple[np.ndarray, list]:
    image = np.concatenate([_infer(gfpgan, fr.network_input(face)[None]) for face in faces]) if faces else None
    return image, [fr.restored_image(im) for im in (image if image is not None else [])]


def _parse_masks(parsenet, restored: list) -> list:
    masks = []
    for face in restored:
        logits = _infer(parsenet, fr.network_input(face, float64_division=False)[None])
        masks.append(fr.parse_mask(logits[0].argmax(axis=0)))
    return masks


def run_gfpgan(inputs: dict, entry: dict, ctx) -> dict:
    image, restored = _restore(ctx.module("gfpgan", entry["weights_seed"]), [inputs["face"]])
    return {"image": image, "restored": restored[0]}


def run_parsenet(inputs: dict, entry: dict, ctx) -> dict:
    from . import RTOL

    logits = _infer(ctx.module("parsenet", entry["weights_seed"]), fr.network_input(inputs["face"], False)[None])
    top2 = np.sort(logits[0], axis=0)[-2:]
    ties = (top2[1] - top2[0]) <= 2 * RTOL * max(1.0, float(np.abs(logits).max()))
    return {"parse": logits[0].argmax(axis=0).astype(np.int64), "parse.ties": ties,
            "logits_sub": logits[:, :, LOGITS_SUB, LOGITS_SUB]}


def _geometry(inputs: dict, entry: dict) -> tuple[list, list, list]:
    points = fr.points_from_detections(inputs["detections"], entry["config"].get("eye_dist_threshold", 5))
    affines = [fr.align_affine(p) for p in points]
    return points, affines, [fr.inverse_affine(a, entry["config"]["upscale"]) for a in affines]


def run_face_restore_geometry(inputs: dict, entry: dict, ctx) -> dict:
    image, restored = inputs["image"], list(inputs["restored"])
    points, affines, inverses = _geometry(inputs, entry)
    return {
        "landmarks": np.stack(points).astype(np.float32),
        "affine": np.stack(affines),
        "cropped": np.stack([fr.warp_face(image, a) for a in affines]),
        "inverse_affine": np.stack(inverses),
        "pasted": fr.paste_faces(image, restored, inverses, entry["config"]["upscale"]),
    }


def run_face_restore_parse_paste(inputs: dict, entry: dict, ctx) -> dict:
    image, restored = inputs["image"], list(inputs["restored"])
    _, affines, inverses = _geometry(inputs, entry)
    masks = _parse_masks(ctx.module(entry["config"].get("manifest", "parsenet"), entry["weights_seed"]), restored)
    return {"affine": np.stack(affines), "inverse_affine": np.stack(inverses),
            "pasted": fr.paste_faces(image, restored, inverses, entry["config"]["upscale"], masks)}


def run_enhance(inputs: dict, entry: dict, ctx) -> dict:
    seeds = entry["config"]["seeds"]
    image = inputs["image"]
    _, affines, inverses = _geometry(inputs, entry)
    cropped = [fr.warp_face(image, a) for a in affines]
    _, restored = _restore(ctx.module("gfpgan", seeds["gfpgan"]), cropped)
    masks = _parse_masks(ctx.module("parsenet", seeds["parsenet"]), restored)
    return {"cropped": np.stack(cropped), "restored": np.stack(restored),
            "output": fr.paste_faces(image, restored, inverses, entry["config"]["upscale"], masks)}


RUNNERS = {
    "gfpgan": run_gfpgan,
    "parsenet": run_parsenet,
    "face_restore_geometry": run_face_restore_geometry,
    "face_restore_parse_paste": run_face_restore_parse_paste,
    "enhance": run_enhance,
}
