"""Conformance runners for the face renderer: KPDetector, MappingNet, keypoint transform, generator, make_animation."""
from __future__ import annotations

import functools

import numpy as np

MAPPING_MANIFEST = {70: "mapping", 73: "mapping_full"}


def _torch_runner(fn):
    """Runs ``fn`` under inference mode with numpy inputs turned into tensors and tensor outputs into numpy."""

    @functools.wraps(fn)
    def run(inputs: dict[str, np.ndarray], entry: dict, ctx) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
            outputs = fn(tensors, entry, ctx)
        return {k: v.numpy() for k, v in outputs.items()}

    return run


@_torch_runner
def run_kp_detector(inputs, entry, ctx):
    return {"kp": ctx.module("kp_detector", entry["weights_seed"])(inputs["image"])}


@_torch_runner
def run_generator(inputs, entry, ctx):
    generator = ctx.module("generator", entry["weights_seed"])
    return generator(inputs["image"], kp_source=inputs["kp_source"], kp_driving=inputs["kp_driving"])


def _mapping_runner(stage: str):
    @_torch_runner
    def run(inputs, entry, ctx):
        from ..models.mapping import OUTPUT_NAMES

        return dict(zip(OUTPUT_NAMES, ctx.module(stage, entry["weights_seed"])(inputs["semantics"])))

    return run


@_torch_runner
def run_keypoint_transformation(inputs, entry, ctx):
    from ..models.mapping import OUTPUT_NAMES, keypoint_transformation

    return {"kp": keypoint_transformation(inputs["kp_canonical"], *(inputs[k] for k in OUTPUT_NAMES))}


@_torch_runner
def run_animation(inputs, entry, ctx):
    """The official ``make_animation`` loop, with the source-only part of the generator computed once."""
    import torch

    from ..models.mapping import MappingWithTransform

    seeds = entry["config"]["seeds"]
    image, source_semantics, target_semantics = inputs["image"], inputs["source_semantics"], inputs["target_semantics"]
    kp_detector = ctx.module("kp_detector", seeds["kp_detector"])
    generator = ctx.module("generator", seeds["generator"])
    mapping = MappingWithTransform(ctx.module(MAPPING_MANIFEST[source_semantics.shape[1]], seeds["mapping"]))

    kp_canonical = kp_detector(image)
    kp_source = mapping(kp_canonical, source_semantics)
    feature_3d, source_compressed = generator.encode_source(image)
    frames = []
    for index in range(target_semantics.shape[1]):
        kp_driving = mapping(kp_canonical, target_semantics[:, index])
        frames.append(generator.render(feature_3d, source_compressed, kp_source, kp_driving)["prediction"])
    return {"frames": torch.stack(frames, dim=1)}


RUNNERS = {
    "kp_detector": run_kp_detector,
    "generator": run_generator,
    "mapping": _mapping_runner("mapping"),
    "mapping_full": _mapping_runner("mapping_full"),
    "keypoint_transformation": run_keypoint_transformation,
    "animation": run_animation,
}
