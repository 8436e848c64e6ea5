"""Runners for the free-view and reference-video stages, through the pipeline's own code: the numerics of
``sadtalker_rt.runtime.overrides``, the torch backend's stage modules and the frame scheduler."""
from __future__ import annotations

import numpy as np

from ..runtime import coeffs, overrides
from ..stages import EXPRESSION, FULL_COEFFS
from . import MANIFEST_SUBNETWORK


def run_free_view_pose(inputs: dict, entry: dict, ctx) -> dict:
    degrees = [int(d) for d in np.asarray(inputs["degrees"]).reshape(-1)]
    return {"seq": overrides.gen_camera_pose(degrees, int(inputs["frame_num"]), int(inputs["batch_size"]))}


def run_free_view_keypoints(inputs: dict, entry: dict, ctx) -> dict:
    """The free-view mapping stage's transform, fed as the pipeline feeds it (angles, angle_given)."""
    import torch

    from ..models.mapping import OUTPUT_NAMES, keypoint_transformation_free_view

    batch = inputs["kp_canonical"].shape[0]
    angles = np.zeros((batch, 3), np.float32)
    given = np.zeros((1, 3), np.float32)
    for i, name in enumerate(overrides.ANGLE_NAMES):
        if f"{name}_in" in inputs:
            angles[:, i], given[0, i] = inputs[f"{name}_in"], 1.0
    tensors = {k: torch.from_numpy(np.ascontiguousarray(inputs[k])) for k in ("kp_canonical",) + OUTPUT_NAMES}
    with torch.inference_mode():
        kp = keypoint_transformation_free_view(tensors["kp_canonical"], *(tensors[k] for k in OUTPUT_NAMES),
                                               torch.from_numpy(angles), torch.from_numpy(given))
    return {"kp": kp.numpy()}


class _CaseBackend:
    """The torch backend's runners over stage modules built from this case's synthetic weights."""

    def __init__(self, ctx, seeds: dict):
        self.ctx, self.seeds, self._runners = ctx, seeds, {}
        self.subnetwork_manifest = {sub: manifest for manifest, sub in MANIFEST_SUBNETWORK.items()}

    def subnetwork(self, name: str):
        manifest = self.subnetwork_manifest[name]
        return self.ctx.module(manifest, self.seeds[manifest if manifest in self.seeds else "mapping"])

    def runner(self, stage: str):
        from ..runtime.backends.torch_backend import TorchRunner
        from ..models.stage_modules import stage_module
        from ..stages import STAGES

        if stage not in self._runners:
            self._runners[stage] = TorchRunner(STAGES[stage], stage_module(stage, self.subnetwork), "cpu")
        return self._runners[stage]


def _frame_order(lanes: np.ndarray, frame_num: int) -> np.ndarray:
    """(batch_size, steps, ...) lane layout of ``get_facerender_data`` -> (frame_num, ...) in frame order."""
    return lanes.reshape((-1,) + lanes.shape[2:])[:frame_num]


def run_free_view_animation(inputs: dict, entry: dict, ctx) -> dict:
    """The pipeline's per-frame path: source features, then the free-view mapping and renderer per batch."""
    from ..runtime.scheduler import FramePipeline, SerialExecutor
    from ..stages import mapping_stage

    config = entry["config"]
    frame_num, batch_size = int(config["frame_num"]), int(config["batch_size"])
    image, source_semantics = inputs["image"], inputs["source_semantics"]
    full = source_semantics.shape[1] == FULL_COEFFS
    preprocess = "full" if full else "crop"
    backend = _CaseBackend(ctx, config["seeds"])

    degrees = config.get("degrees") or {}
    view = overrides.FreeView(**{name: degrees.get(name) for name in overrides.ANGLE_NAMES})
    angles, given = view.angles(frame_num)
    for i, name in enumerate(overrides.ANGLE_NAMES):
        recorded = inputs.get(f"{name}_c_seq")
        if recorded is None:
            continue
        recorded = _frame_order(recorded, frame_num).astype(np.float32)
        if not given[0, i]:             # no list in the config: take the recorded sequence as given
            angles[:, i], given[0, i] = recorded, 1.0
        elif not np.array_equal(angles[:, i], recorded):
            raise AssertionError(f"{name}: free_view_sequence {angles[:, i].tolist()} differs from the recorded "
                                 f"sequence {recorded.tolist()}")

    # The official code repeats the photo and its coefficients batch_size times before make_animation, and
    # float32 kernels sum in another order at another batch size; the renderer amplifies a 3e-8 difference in
    # the keypoints to 2e-4 in the frames. The per-image stages run as it runs them, and give batch row 0.
    image_rows = np.repeat(image, batch_size, axis=0)
    kp_canonical = backend.runner("kp_detector").infer({"source_image": image_rows})["kp_canonical"]
    encoded = backend.runner("source_encoder").infer({"source_image": image_rows})
    kp_source = backend.runner(mapping_stage(preprocess)).infer(
        {"kp_canonical": kp_canonical, "semantics": np.repeat(source_semantics, batch_size, axis=0)})["kp"]
    kp_canonical, kp_source = kp_canonical[:1], kp_source[:1]
    encoded = {name: value[:1] for name, value in encoded.items()}
    features = {"kp_canonical": kp_canonical, "kp_source": kp_source, **encoded, "angle_given": given}
    pipeline = FramePipeline(SerialExecutor(backend.runner), features, image.shape[-1], batch_size,
                             mapping=mapping_stage(preprocess, free_view=True))
    targets = _frame_order(inputs["target_semantics"], frame_num)
    frames = np.stack([frame.copy() for _, frame in pipeline.frames(targets, per_frame={"angles": angles})])
    return {"frames": frames}


def run_ref_eyeblink(inputs: dict, entry: dict, ctx) -> dict:
    from ..runtime.backends.torch_backend import TorchRunner
    from ..models.stage_modules import stage_module
    from ..stages import STAGES

    indiv_mels = inputs["indiv_mels"][0]                       # (T, 1, 80, 16)
    frames = indiv_mels.shape[0]
    drawn = coeffs.blink_sequence(frames, np.random.default_rng(0))     # drawn, then replaced by zeros
    ref, blink = overrides.expression_inputs(inputs["source_coeffs"], drawn, inputs["ref_coeffs"])
    module = ctx.module(entry["config"].get("manifest", "audio2exp"), entry["weights_seed"])
    runner = TorchRunner(STAGES["audio2exp"], stage_module("audio2exp", lambda name: module), "cpu")
    exp = runner.infer({"indiv_mels": indiv_mels, "ref_exp": ref[:, EXPRESSION], "blink": blink})["exp"]
    return {"ref": ref[None], "ratio": blink[None], "exp": exp[None]}


def run_ref_pose(inputs: dict, entry: dict, ctx) -> dict:
    smoothed = coeffs.smooth_pose(inputs["pose"][0])
    return {"coeffs": overrides.motion_coeffs(inputs["exp"][0], smoothed, inputs["ref_coeffs"])}


RUNNERS = {
    "free_view_pose": run_free_view_pose,
    "free_view_keypoints": run_free_view_keypoints,
    "free_view_animation": run_free_view_animation,
    "ref_eyeblink": run_ref_eyeblink,
    "ref_pose": run_ref_pose,
}
