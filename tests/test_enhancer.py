"""The face enhancer: official keys, weight files, conformance of the five enhancer stages, the runtime path."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sadtalker_rt.runtime import face_restore as fr  # noqa: E402
from sadtalker_rt.conformance import run_directory  # noqa: E402
from sadtalker_rt.runtime.enhancer import FaceEnhancer  # noqa: E402
from sadtalker_rt.models.enhancer_weights import EnhancerWeights  # noqa: E402
from sadtalker_rt.errors import UsageError, WeightsError  # noqa: E402
from sadtalker_rt.stages import ENHANCER_NOISE_SIDES  # noqa: E402



@pytest.mark.parametrize("stage,module", [("gfpgan", "gfpgan"), ("parsenet", "parsenet")])
def test_official_template_matches_manifest(enhancer_cases, stage, module):
    import importlib

    keys = json.loads((enhancer_cases / "manifest" / f"{stage}.json").read_text())["keys"]
    expected = {k: (tuple(shape), dtype) for k, (shape, dtype) in keys.items()}
    assert importlib.import_module(f"sadtalker_rt.models.{module}").official_template() == expected


@pytest.mark.parametrize("stage", ["face_restore_geometry", "parsenet", "face_restore_parse_paste"])
def test_enhancer_conformance(enhancer_cases, stage):
    results = run_directory(enhancer_cases, stages={stage})
    assert results, f"{enhancer_cases} has no {stage} case"
    for r in results:
        assert r.passed, f"{r.stage}/{r.case}: {r.error or [(o.name, o.max_abs) for o in r.outputs if not o.passed]}"


@pytest.mark.heavy
@pytest.mark.parametrize("stage", ["gfpgan", "enhance"])
def test_enhancer_conformance_gfpgan(enhancer_cases, stage):
    test_enhancer_conformance(enhancer_cases, stage)


def test_swapped_enhancer_files_are_refused(tmp_path):
    parse_like = {"out_mask_conv.conv2d.weight": torch.zeros(19, 64, 3, 3)}
    gfpgan_like = {"params_ema": {"conv_body_first.weight": torch.zeros(32, 3, 1, 1)}}
    (tmp_path / "a").mkdir()
    torch.save(parse_like, tmp_path / "a" / "GFPGANv1.4.pth")
    with pytest.raises(WeightsError, match="face parsing network, not GFPGAN"):
        EnhancerWeights(tmp_path / "a").state_dict("gfpgan")
    (tmp_path / "b").mkdir()
    torch.save(gfpgan_like, tmp_path / "b" / "parsing_parsenet.pth")
    with pytest.raises(WeightsError, match="holds GFPGAN weights"):
        EnhancerWeights(tmp_path / "b").state_dict("parsenet")
    torch.save(gfpgan_like, tmp_path / "b" / "GFPGANv1.4.pth")
    with pytest.raises(WeightsError, match=r"does not match GFPGANv1Clean: missing 284 keys"):
        EnhancerWeights(tmp_path / "b").build("gfpgan")
    torch.save({"params": gfpgan_like["params_ema"]}, tmp_path / "b" / "GFPGANv1.4.pth")   # falls back to params
    assert set(EnhancerWeights(tmp_path / "b" / "GFPGANv1.4.pth").state_dict("gfpgan")) == {"conv_body_first.weight"}


def test_files_found_in_sadtalkers_gfpgan_weights_folder(tmp_path):
    folder = tmp_path / "gfpgan" / "weights"
    folder.mkdir(parents=True)
    (tmp_path / "checkpoints").mkdir()
    torch.save({"params_ema": {"x": torch.zeros(1)}}, folder / "GFPGANv1.4.pth")
    weights = EnhancerWeights(tmp_path / "checkpoints")
    assert weights.path("gfpgan") == folder / "GFPGANv1.4.pth"
    assert not weights.has("parsenet")


class _FakeBackend:
    """Stands in for the enhancer graphs: GFPGAN returns its input face, the parser marks every pixel as skin."""

    class _Runner:
        def __init__(self, fn):
            self.infer = fn

    def __init__(self):
        self.fed = []

    def runner(self, stage):
        if stage == "enhancer":
            def enhance(feeds):
                self.fed.append(feeds)
                return {"image": feeds["face"]}
            return self._Runner(enhance)
        return self._Runner(lambda feeds: {"parse": np.ones((feeds["face"].shape[0], 512, 512), np.int64)})


def test_enhancer_output_is_twice_the_size_and_keeps_the_face():
    yy, xx = np.mgrid[0:200, 0:160]
    frame = np.stack([xx * 1.5, yy, 255 - yy], axis=-1).astype(np.uint8)     # smooth, so resampling keeps it
    points = np.array([[65, 85], [95, 85], [80, 100], [68, 118], [92, 118]], np.float32)
    stored = [np.zeros((1, 1, s, s), np.float32) for s in ENHANCER_NOISE_SIDES]
    backend = _FakeBackend()
    enhancer = FaceEnhancer(backend, stored)
    enhancer.set_points(points)
    (out,) = enhancer([frame], [0])
    assert out.shape == (400, 320, 3) and out.dtype == np.uint8
    # An identity restorer pastes back the face it was given: close to the Lanczos-upscaled frame there.
    reference = fr.upscale_background(frame, 2).astype(float)
    assert np.abs(out[150:250, 120:200].astype(float) - reference[150:250, 120:200]).mean() < 3
    assert np.array_equal(out[:20], reference[:20].astype(np.uint8))     # background untouched far from the face


def test_noise_modes():
    stored = [np.full((1, 1, s, s), 0.5, np.float32) for s in ENHANCER_NOISE_SIDES]
    enhancer = FaceEnhancer(_FakeBackend(), stored)
    fixed = enhancer.noise([3, 4], "fixed", 0)
    assert fixed["noise14"].shape == (2, 1, 512, 512) and np.all(fixed["noise0"] == 0.5)
    a, b = enhancer.noise([3, 4], "seeded", 7), enhancer.noise([3], "seeded", 7)
    assert np.array_equal(a["noise5"][:1], b["noise5"]) and not np.array_equal(a["noise5"][0], a["noise5"][1])
    assert not np.array_equal(enhancer.noise([3], "fresh", 7)["noise5"], b["noise5"])
    with pytest.raises(UsageError):
        FaceEnhancer(_FakeBackend(), None).noise([0], "fixed", 0)


def test_points_from_dlib_landmarks_follow_the_template_order():
    lm = np.zeros((68, 2))
    lm[36:42] = [10, 20]
    lm[42:48] = [30, 20]
    lm[30] = [20, 30]
    lm[48], lm[54] = [12, 40], [28, 40]
    assert fr.points_from_landmarks68(lm).tolist() == [[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]]


def _run_cli(*args: str) -> int:
    from sadtalker_rt.cli import main

    try:
        main(list(args))
    except SystemExit as exit_:
        return exit_.code
    return 0


def _enhanced_video(tmp_path, assets_dir, photo: str, preprocess: str, seconds: str = "0.04"):
    from sadtalker_rt import media

    out = tmp_path / f"{photo}-{preprocess}.mp4"
    assert _run_cli("run", str(assets_dir / photo), str(assets_dir / "RD_Radio31_000.wav"), "-o", str(out),
                    "--synthetic-weights", "--duration", seconds, "--preprocess", preprocess, "--enhancer", "gfpgan",
                    "--batch-size", "1", "--quiet") == 0
    return media.probe_video(out)


@pytest.mark.heavy
def test_run_with_enhancer_writes_video_at_twice_the_size(tmp_path, assets_dir):
    info = _enhanced_video(tmp_path, assets_dir, "art_0.png", "crop")
    assert (info["width"], info["height"]) == (512, 512) and info["frames"] == 1
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac"


@pytest.mark.heavy
@pytest.mark.parametrize("preprocess", ["crop", "extcrop", "resize", "full", "extfull"])
@pytest.mark.parametrize("photo", ["art_0.png", "happy.png", "full_body_1.png"])
def test_run_with_enhancer_every_photo_and_mode(tmp_path, assets_dir, photo, preprocess):
    from sadtalker_rt import media

    plain = tmp_path / "plain.mp4"
    assert _run_cli("run", str(assets_dir / photo), str(assets_dir / "RD_Radio31_000.wav"), "-o", str(plain),
                    "--synthetic-weights", "--duration", "0.04", "--preprocess", preprocess, "--quiet") == 0
    base = media.probe_video(plain)
    info = _enhanced_video(tmp_path, assets_dir, photo, preprocess, "0.08")
    assert (info["width"], info["height"]) == (2 * base["width"], 2 * base["height"])
    assert info["frames"] == 2 and info["audio_codec"] == "aac"


def test_run_refuses_a_wrong_enhancer_file(tmp_path, assets_dir, capsys):
    bad = tmp_path / "GFPGANv1.4.pth"
    torch.save({"out_mask_conv.conv2d.weight": torch.zeros(19, 64, 3, 3)}, bad)
    code = _run_cli("run", str(assets_dir / "art_0.png"), str(assets_dir / "RD_Radio31_000.wav"), "-o",
                    str(tmp_path / "x.mp4"), "--synthetic-weights", "--enhancer", "gfpgan", "--enhancer-weights",
                    str(bad), "--quiet")
    assert code == WeightsError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "not GFPGAN v1.4" in err[-1]
    assert not (tmp_path / "x.mp4").exists()
