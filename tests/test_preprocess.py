"""Source-image preprocessing: dlib landmarks, the official crop geometry, 3DMM alignment, the regressor."""
from __future__ import annotations

import ast

import cv2
import numpy as np
import pytest

from sadtalker_rt import media
from sadtalker_rt.runtime import landmarks
from sadtalker_rt.runtime import preprocess
from sadtalker_rt.errors import InputError, UsageError, WeightsError

PREPROCESS_STAGES = {"crop_geometry", "first_frame_coeffs", "face3d_recon"}
PHOTO_CASES = {"happy.png": "c0", "art_0.png": "c1", "full_body_1.png": "c2"}   # crop_geometry cases


@pytest.fixture(scope="module")
def photos(assets_dir):
    return {name: media.load_image(assets_dir / name) for name in PHOTO_CASES}


@pytest.fixture(scope="module")
def found(photos):
    return {name: landmarks.detect(image, name=name) for name, image in photos.items()}


def test_preprocess_conformance_cases(conformance_dir):
    from sadtalker_rt.conformance import run_directory

    results = run_directory(conformance_dir, stages=PREPROCESS_STAGES)
    assert {r.stage for r in results} == PREPROCESS_STAGES
    failed = [f"{r.stage}/{r.case}: {r.error or [(o.name, o.max_abs) for o in r.outputs if not o.passed]}"
              for r in results if not r.passed]
    assert not failed, failed


def test_dlib_landmarks_match_the_recorded_ones(found, conformance_dir):
    for name, case in PHOTO_CASES.items():
        assert found[name].faces_found == 1 and found[name].notes == []
        with np.load(conformance_dir / "cases" / f"crop_geometry__{case}.npz") as data:
            recorded = data["in.landmarks"]
        assert found[name].landmarks.shape == (68, 2)
        assert np.abs(found[name].landmarks - recorded).max() <= 3.0, name


@pytest.mark.parametrize("mode", preprocess.PREPROCESS_MODES)
def test_every_mode_gives_a_square_frame_and_consistent_crop_info(mode, photos, found):
    for name, image in photos.items():
        height, width = image.shape[:2]
        lm = None if mode == "resize" else found[name].landmarks
        frame, info = preprocess.crop_source(image, lm, mode, 256)
        assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
        assert info.mode == mode and info.image_size == (width, height)
        x1, y1, x2, y2 = info.original_box
        assert info.tight_size == (x2 - x1, y2 - y1)
        if mode == "resize":
            assert info.crop_box is None and info.quad_box is None
            assert info.original_box == (0, 0, width, height) == info.paste_box
            continue
        assert info.rsize == (width, height)       # no photo here is big enough to shrink
        clx, cly, crx, cry = info.crop_box
        assert 0 <= clx < crx <= width and 0 <= cly < cry <= height
        lx, ly, rx, ry = (int(v) for v in info.quad_box)
        assert (x1, y1, x2, y2) == (clx + lx, cly + ly, clx + rx, cly + ry)
        assert clx <= x1 < x2 <= crx and cly <= y1 < y2 <= cry
        region = image[cly:cry, clx:crx] if mode.startswith("ext") else image[y1:y2, x1:x2]
        assert info.paste_box == ((clx, cly, crx, cry) if mode.startswith("ext") else info.original_box)
        np.testing.assert_array_equal(frame, cv2.resize(np.ascontiguousarray(region), (256, 256)))


def test_unknown_mode_and_missing_landmarks_are_usage_errors(photos):
    image = photos["happy.png"]
    with pytest.raises(UsageError):
        preprocess.crop_source(image, None, "zoom", 256)
    with pytest.raises(UsageError):
        preprocess.crop_source(image, None, "crop", 256)


def test_shrink_branch_divides_the_geometry(found):
    """Faces of qsize >= 2048 px: the official code works on the image shrunk by floor(qsize / 1024)."""
    lm = found["art_0.png"].landmarks.astype(np.float64)
    big = preprocess.align_face_box((896 * 4, 640 * 4, 3), lm * 4)
    half = preprocess.align_face_box((896 * 2, 640 * 2, 3), lm * 2)
    assert big.rsize == (1280, 1792)
    assert big == half
    _, info = preprocess.crop_source(np.zeros((896 * 4, 640 * 4, 3), np.uint8), lm * 4, "crop", 64)
    _, half_info = preprocess.crop_source(np.zeros((896 * 2, 640 * 2, 3), np.uint8), lm * 2, "crop", 64)
    assert info.rsize == (1280, 1792) and info.region_box == half_info.region_box
    # cv2 pixel centres: shrinking by 2 moves a point by 0.25 px before the crop resize
    np.testing.assert_allclose(preprocess.points_in_frame(lm * 4, info, 64),
                               preprocess.points_in_frame(lm * 2, half_info, 64), atol=0.05)


@pytest.mark.parametrize("mode", ["crop", "extcrop"])
def test_points_in_frame_agree_with_a_second_detection(mode, photos, found):
    for name in ("art_0.png", "full_body_1.png"):
        frame, info = preprocess.crop_source(photos[name], found[name].landmarks, mode, 256)
        mapped = preprocess.points_in_frame(found[name].landmarks, info, 256)
        error = np.abs(landmarks.detect(frame).landmarks - mapped)
        assert error.max() < 6 and np.median(error) < 1, name


def test_grey_image_has_no_face():
    with pytest.raises(InputError, match="grey.png"):
        landmarks.detect(np.full((240, 320, 3), 128, np.uint8), name="grey.png")


@pytest.mark.parametrize("large_first", [True, False])
def test_two_faces_pick_the_larger(photos, large_first):
    face = photos["happy.png"]
    canvas = np.full((256, 512, 3), 128, np.uint8)
    large, small = (slice(0, 256), slice(320, 448)) if large_first else (slice(256, 512), slice(32, 160))
    canvas[:, large] = face
    canvas[64:192, small] = cv2.resize(face, (128, 128), interpolation=cv2.INTER_AREA)
    result = landmarks.detect(canvas)
    assert result.faces_found == 2 and len(result.notes) == 1
    left, _, right, _ = result.box
    assert large.start <= (left + right) / 2 < large.stop


def test_template_landmarks_when_no_face_was_found():
    frame = np.full((256, 256, 3), 200, np.uint8)
    trans_params, aligned = preprocess.align_for_3dmm(frame, -np.ones((68, 2), np.float32))
    assert aligned.shape == (224, 224, 3) and aligned.dtype == np.uint8
    assert trans_params.dtype == np.float32 and tuple(trans_params[:2]) == (256, 256)
    assert np.isfinite(trans_params).all() and trans_params[2] > 0


def test_first_frame_coeffs_layout():
    raw = np.arange(257, dtype=np.float32)[None]
    coeffs = preprocess.first_frame_coeffs(raw, np.array([256, 256, 1.5, 120, 110], np.float32))
    assert coeffs.shape == (1, 73) and coeffs.dtype == np.float32
    np.testing.assert_array_equal(coeffs[0, :64], np.arange(80, 144))
    np.testing.assert_array_equal(coeffs[0, 64:70], [224, 225, 226, 254, 255, 256])
    np.testing.assert_array_equal(coeffs[0, 70:], [1.5, 120, 110])


def _official_rows(conformance_dir, prefix):
    rows = {}
    for line in (conformance_dir / "manifest" / "official_safetensors_keys.tsv").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        if key.startswith(prefix):
            rows[key[len(prefix):]] = (tuple(ast.literal_eval(shape)), dtype.replace("torch.", ""))
    return rows


def test_face3d_recon_template_is_the_official_key_set(conformance_dir):
    from sadtalker_rt.models import face3d_recon

    assert face3d_recon.official_template() == _official_rows(conformance_dir, "face_3drecon.")


def test_face3d_recon_build_refuses_missing_and_extra_keys():
    from sadtalker_rt.models import face3d_recon

    weights = {k: np.zeros(shape, dtype) for k, (shape, dtype) in face3d_recon.official_template().items()}
    missing = dict(weights)
    del missing["final_layers.6.bias"]
    with pytest.raises(WeightsError, match="missing 1 keys"):
        face3d_recon.build(missing, "test weights")
    extra = dict(weights, **{"backbone.fc.weight": np.zeros((257, 2048), np.float32)})
    with pytest.raises(WeightsError, match="unexpected 1 keys"):
        face3d_recon.build(extra, "test weights")
