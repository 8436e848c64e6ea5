"""Face renderer reference modules: recorded official numerics, official key layout, source caching and the
export-friendly grid sample."""
from __future__ import annotations

import ast
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from sadtalker_rt.conformance import run_directory  # noqa: E402

from conftest import assert_conformance  # noqa: E402
from sadtalker_rt.errors import WeightsError  # noqa: E402
from sadtalker_rt.models import generator, kp_detector, mapping  # noqa: E402
from sadtalker_rt.models.ops import grid_sample_3d, grid_sample_3d_decomposed, use_decomposed_grid_sample  # noqa: E402
from sadtalker_rt.models.synthetic import synthetic_state_dict  # noqa: E402

RENDER_STAGES = ["kp_detector", "generator", "mapping", "mapping_full", "keypoint_transformation", "animation"]


@pytest.mark.parametrize("stage", RENDER_STAGES)
def test_render_conformance(conformance_dir, stage, recording_kernels):
    assert_conformance(run_directory(conformance_dir, stages={stage}), stage, recording_kernels)


def _tsv_template(conformance_dir, prefix: str) -> dict:
    rows = (conformance_dir / "manifest" / "official_safetensors_keys.tsv").read_text().splitlines()
    template = {}
    for row in rows:
        key, shape, dtype = row.split("\t")
        if key.startswith(prefix):
            template[key[len(prefix):]] = (tuple(ast.literal_eval(shape)), dtype.replace("torch.", ""))
    return template


@pytest.mark.parametrize("prefix, module", [("kp_extractor.", kp_detector), ("generator.", generator)])
def test_official_template_matches_safetensors_keys(conformance_dir, prefix, module):
    expected = _tsv_template(conformance_dir, prefix)
    assert expected, f"no '{prefix}*' rows in official_safetensors_keys.tsv"
    assert module.official_template() == expected


@pytest.mark.parametrize("stage, coeff_nc", [("mapping", 70), ("mapping_full", 73)])
def test_mapping_template_matches_manifest(conformance_dir, stage, coeff_nc):
    keys = json.loads((conformance_dir / "manifest" / f"{stage}.json").read_text())["keys"]
    assert mapping.official_template(coeff_nc=coeff_nc) == {k: (tuple(s), d) for k, (s, d) in keys.items()}


@pytest.fixture(scope="module")
def generator_state_dict():
    return synthetic_state_dict(generator.official_template(), seed=5)


@pytest.fixture(scope="module")
def synthetic_generator(generator_state_dict):
    return generator.build(generator_state_dict, "synthetic generator (seed 5)")


def _render_inputs(size: int, seed: int = 0):
    rng = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, size, size, generator=rng)
    kp_source = 0.4 * torch.rand(1, 15, 3, generator=rng) - 0.2
    kp_driving = kp_source + 0.05 * torch.randn(1, 15, 3, generator=rng)
    return image, kp_source, kp_driving


def test_encode_source_then_render_equals_forward(synthetic_generator):
    image, kp_source, kp_driving = _render_inputs(256)
    with torch.inference_mode():
        full = synthetic_generator(image, kp_source, kp_driving)
        feature_3d, source_compressed = generator.SourceEncoder(synthetic_generator)(image)
        split = generator.FrameRenderer(synthetic_generator, with_aux=True)(feature_3d, source_compressed,
                                                                           kp_source, kp_driving)
    assert feature_3d.shape == (1, 32, 16, 64, 64) and source_compressed.shape == (1, 4, 16, 64, 64)
    for name, value in zip(("prediction", "mask", "occlusion_map"), split):
        assert torch.equal(value, full[name]), f"{name} differs between forward and encode_source + render"


def test_decomposed_grid_sample_in_generator(synthetic_generator):
    # 128 is the smallest size the 5-level hourglass accepts; the warp code is the same at 256 and 512.
    image, kp_source, kp_driving = _render_inputs(128, seed=1)
    renderer = generator.FrameRenderer(synthetic_generator)
    with torch.inference_mode():
        source = synthetic_generator.encode_source(image)
        native = renderer(*source, kp_source, kp_driving)
        with use_decomposed_grid_sample(True):
            decomposed = renderer(*source, kp_source, kp_driving)
    assert native.shape == (1, 3, 128, 128)
    assert (native - decomposed).abs().max() <= 1e-5


def _check_grid_sample(grid: torch.Tensor, volume: torch.Tensor) -> None:
    expected = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ours = grid_sample_3d_decomposed(volume, grid)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max() <= 1e-6


def test_decomposed_grid_sample_random_and_out_of_range():
    rng = torch.Generator().manual_seed(0)
    volume = torch.randn(3, 4, 5, 6, 7, generator=rng)
    _check_grid_sample(2.4 * torch.rand(3, 4, 5, 6, 3, generator=rng) - 1.2, volume)
    _check_grid_sample(50 * torch.randn(3, 4, 5, 6, 3, generator=rng), volume)
    _check_grid_sample(torch.full((3, 2, 2, 2, 3), -7.5), volume)


def test_decomposed_grid_sample_on_borders():
    volume = torch.randn(2, 3, 5, 6, 7, generator=torch.Generator().manual_seed(1))
    axes = []
    for size in (7, 6, 5):      # x runs along W, y along H, z along D
        centres = [(2 * i + 1) / size - 1 for i in range(size)]   # voxel centres: integer positions
        borders = [2 * i / size - 1 for i in range(size + 1)]     # half-way between voxels, and the volume faces
        axes.append(torch.tensor([-1.0, 1.0] + centres + borders))
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([x, y, z], dim=-1).reshape(1, -1, 1, 1, 3).expand(2, -1, 1, 1, 3).contiguous()
    _check_grid_sample(grid, volume)


def test_grid_sample_switch_restores_previous_choice():
    rng = torch.Generator().manual_seed(2)
    volume, grid = torch.randn(1, 2, 3, 4, 5, generator=rng), 2 * torch.rand(1, 3, 4, 5, 3, generator=rng) - 1
    with use_decomposed_grid_sample(True):
        with use_decomposed_grid_sample(False):
            assert torch.equal(grid_sample_3d(volume, grid), F.grid_sample(volume, grid, align_corners=False))
        assert torch.equal(grid_sample_3d(volume, grid), grid_sample_3d_decomposed(volume, grid))
    assert torch.equal(grid_sample_3d(volume, grid), F.grid_sample(volume, grid, align_corners=False))


def test_keypoint_transformation_with_free_view_angles():
    kp = torch.randn(2, 15, 3, generator=torch.Generator().manual_seed(3))
    logits, zeros = torch.randn(2, 66), torch.zeros(2)
    t = torch.tensor([[5.0, 0.25, -5.0]] * 2)
    out = mapping.keypoint_transformation(kp, logits, logits, logits, t, torch.zeros(2, 45),
                                          yaw_in=zeros, pitch_in=zeros, roll_in=zeros)
    assert torch.allclose(out, kp + torch.tensor([0.0, 0.25, 0.0]))    # t_x and t_z are ignored


REFUSAL_CASES = {   # module, config, a key to drop
    "mapping": (mapping, {"coeff_nc": 70}, "fc_t.bias"),
    "kp_detector": (kp_detector, {}, "kp.bias"),
    "generator": (generator, {}, "decoder.conv_img.bias"),
}


@pytest.mark.parametrize("name", REFUSAL_CASES)
def test_build_refuses_missing_and_extra_keys(name, request):
    module, cfg, dropped = REFUSAL_CASES[name]
    if module is generator:
        state_dict = request.getfixturevalue("generator_state_dict")
    else:
        state_dict = synthetic_state_dict(module.official_template(**cfg), 1)
    missing = {k: v for k, v in state_dict.items() if k != dropped}
    with pytest.raises(WeightsError, match=r"weights\.bin.*missing 1 keys.*" + dropped.replace(".", r"\.")):
        module.build(missing, "weights.bin", **cfg)
    extra = dict(state_dict, **{"extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match=r"weights\.bin.*unexpected 1 keys \(extra\.weight\)"):
        module.build(extra, "weights.bin", **cfg)


@pytest.mark.heavy
def test_render_at_512(synthetic_generator):
    detector = kp_detector.build(synthetic_state_dict(kp_detector.official_template(), 7), "synthetic kp_detector")
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        kp_canonical = detector(image)
        kp_driving = kp_canonical + 0.02 * torch.randn(1, 15, 3, generator=torch.Generator().manual_seed(5))
        feature_3d, source_compressed = synthetic_generator.encode_source(image)
        out = synthetic_generator.render(feature_3d, source_compressed, kp_canonical, kp_driving)
    assert kp_canonical.shape == (1, 15, 3) and bool(kp_canonical.abs().max() <= 1)
    assert feature_3d.shape == (1, 32, 16, 128, 128) and source_compressed.shape == (1, 4, 16, 128, 128)
    assert out["prediction"].shape == (1, 3, 512, 512) and bool(torch.isfinite(out["prediction"]).all())
    assert 0 <= out["prediction"].min() and out["prediction"].max() <= 1
    assert out["mask"].shape == (1, 16, 16, 128, 128)
    assert torch.allclose(out["mask"].sum(dim=1), torch.ones(1, 16, 128, 128), atol=1e-5)
    assert out["occlusion_map"].shape == (1, 1, 128, 128)
