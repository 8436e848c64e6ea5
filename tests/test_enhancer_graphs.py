"""The enhancer as stages of the stage table: export with validation, FP16 with islands, the cache, and the
enhancer on the onnxruntime backend's graphs. GFPGAN at 512 is ~100 GFLOP a face, so the exports are heavy."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sadtalker_rt.build.export.onnx_export import EXPORT_ORDER
from sadtalker_rt.errors import UsageError, WeightsError
from sadtalker_rt.parity import face_psnr, judge
from sadtalker_rt.runtime.enhancer import FIXED_NOISE_FILE, enhancer_on_graphs, load_fixed_noise
from sadtalker_rt.runtime.manifest import sha256_of
from sadtalker_rt.stages import ENHANCER_NOISE_SIDES, ENHANCER_STAGES, ORDER, STAGES


def test_enhancer_stages_are_exported_after_the_default_ones():
    assert EXPORT_ORDER[: len(ORDER)] == ORDER and set(EXPORT_ORDER[len(ORDER):]) == set(ENHANCER_STAGES)
    assert STAGES["enhancer"].dynamic and STAGES["face_parse"].dynamic


def test_faces_are_judged_by_psnr_and_class_maps_by_agreement():
    rng = np.random.default_rng(0)
    face = rng.uniform(-1, 1, (1, 3, 512, 512)).astype(np.float32)
    near = face + rng.normal(0, 1e-3, face.shape).astype(np.float32)        # ~66 dB on [0, 1]

    def image(ours, precision):
        return judge("image", ours, face, STAGES["enhancer"].tolerance(precision, "image"))

    verdict = image(near, "fp16")
    assert verdict.passed and verdict.metric == "face_psnr_db" and verdict.value == face_psnr(near, face) > 60
    verdict = image(face + 0.05, "fp16")
    assert not verdict.passed and "PSNR" in verdict.problem and verdict.value < 40
    assert "relative error" in image(near, "fp32").problem                   # FP32: the relative bound
    parse = rng.integers(0, 19, (1, 512, 512))
    flipped = parse.copy()
    flipped[0, :2, :100] = (flipped[0, :2, :100] + 1) % 19                 # 200 of 262144 pixels: 0.08 %

    def classes(precision):
        return judge("parse", flipped, parse, STAGES["face_parse"].tolerance(precision, "parse"))

    assert classes("fp16").passed and classes("fp16").metric == "agreement"
    assert "classes differ" in classes("fp32").problem


def test_export_refuses_enhancer_stages_without_their_weights(tmp_path):
    from sadtalker_rt.build.export.onnx_export import export_graphs
    from sadtalker_rt.models.checkpoints import WeightSource

    with pytest.raises(UsageError, match="enhancer's weights"):
        export_graphs(WeightSource(synthetic_seed=0), 256, tmp_path, stages=("enhancer",))
    with pytest.raises(UsageError, match="renderer's stages need"):
        export_graphs(None, 256, tmp_path, stages=("renderer",), enhancer_weights=object())


class _GraphBackend:
    """A graph folder's manifest without graphs: what enhancer_on_graphs reads before it runs anything."""

    def __init__(self, directory, stages):
        self.directory = directory
        self.manifest = {"stages": stages}
        self.name = "onnxruntime"


def _noise_folder(tmp_path):
    maps = {f"noise{i}": np.full((1, 1, s, s), i, np.float32) for i, s in enumerate(ENHANCER_NOISE_SIDES)}
    np.savez(tmp_path / FIXED_NOISE_FILE, **maps)
    return {"file": FIXED_NOISE_FILE, "sha256": sha256_of(tmp_path / FIXED_NOISE_FILE)}


def test_enhancer_on_graphs_reads_the_fixed_noise_and_the_parse_stage(tmp_path):
    entry = _noise_folder(tmp_path)
    enhancer = enhancer_on_graphs(_GraphBackend(tmp_path, {"enhancer": {"fixed_noise": entry}}))
    assert not enhancer.parse and enhancer.fixed_noise[3][0, 0, 0, 0] == 3
    assert enhancer.noise([0, 1], "fixed", 0)["noise14"].shape == (2, 1, 512, 512)
    enhancer = enhancer_on_graphs(_GraphBackend(tmp_path, {"enhancer": {"fixed_noise": entry}, "face_parse": {}}))
    assert enhancer.parse
    with pytest.raises(WeightsError, match="no enhancer graph"):
        enhancer_on_graphs(_GraphBackend(tmp_path, {"renderer": {}}))
    (tmp_path / FIXED_NOISE_FILE).write_bytes(b"changed")
    with pytest.raises(WeightsError, match="sha256"):
        load_fixed_noise(tmp_path, {"stages": {"enhancer": {"fixed_noise": entry}}})


def test_graphs_folder_without_the_enhancer_needs_its_weights(tmp_path):
    from sadtalker_rt.backend_choice import BackendChoice

    class Head:
        backend = _GraphBackend(tmp_path, {"renderer": {}})
        backend.precision = "fp32"

    choice = BackendChoice("onnxruntime", graphs=tmp_path)
    with pytest.raises(UsageError, match="has no enhancer graphs"):
        choice.open_enhancer(Head(), None)
    Head.backend.manifest["stages"]["enhancer"] = {}
    with pytest.raises(UsageError, match="leave out --enhancer-weights"):
        choice.open_enhancer(Head(), object())


def test_enhancer_cache_is_keyed_by_weights_and_precision(tmp_path, monkeypatch):
    from sadtalker_rt.build import cache
    from sadtalker_rt.models.enhancer_weights import EnhancerWeights

    monkeypatch.setenv("SADTALKER_RT_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_export(weights, size, out_dir, precision="fp32", stages=(), faces=None, **_):
        calls.append((precision, stages, faces.shape))
        (out_dir / "manifest.json").write_text(json.dumps({"precision": precision}))

    monkeypatch.setattr("sadtalker_rt.build.export.onnx_export.export_graphs", fake_export)
    monkeypatch.setattr("sadtalker_rt.build.export.enhancer_inputs.aligned_faces",
                        lambda photos: np.zeros((len(photos), 3, 512, 512), np.float32))
    weights = EnhancerWeights(synthetic_seed=0)
    first = cache.enhancer_graphs_for(weights, "fp16")
    assert cache.enhancer_graphs_for(weights, "fp16") == first and len(calls) == 1
    assert calls[0] == ("fp16", ENHANCER_STAGES, (2, 3, 512, 512))
    assert len({first, cache.enhancer_graphs_for(weights, "fp32"),
                cache.enhancer_graphs_for(EnhancerWeights(synthetic_seed=1), "fp16")}) == 3


@pytest.fixture(scope="module")
def example_faces(assets_dir):
    from sadtalker_rt.build.export.enhancer_inputs import aligned_faces

    return aligned_faces(sorted(assets_dir.glob("*.png")))


@pytest.mark.heavy
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_enhancer_graphs_match_torch_on_example_photos(tmp_path_factory, example_faces, precision):
    """Real aligned faces of every example photo; FP16 storage emulated on CPU, against float32 PyTorch."""
    from sadtalker_rt.build.export.onnx_export import export_graphs
    from sadtalker_rt.models.enhancer_weights import EnhancerWeights

    out = tmp_path_factory.mktemp(f"enhancer-{precision}")
    manifest = export_graphs(None, 256, out, precision=precision, stages=ENHANCER_STAGES,
                             enhancer_weights=EnhancerWeights(synthetic_seed=0), faces=example_faces)
    rows = manifest["stages"]["enhancer"]["parity"]
    assert sorted(r["shape"][:16] for r in rows) == ["check(face[0]=1,", "trace(face[0]=2,"]     # dynamic batch
    assert all(r["passed"] for s in manifest["stages"].values() for r in s["parity"])
    if precision == "fp16":
        assert min(r["psnr_db"] for r in rows) >= 40.0 and manifest["stages"]["enhancer"]["fp32_islands"]
    assert (out / manifest["stages"]["enhancer"]["fixed_noise"]["file"]).is_file()


@pytest.mark.heavy
def test_run_with_enhancer_on_onnxruntime(tmp_path, assets_dir, monkeypatch):
    """run --backend onnxruntime --enhancer gfpgan: the enhancer's graphs are made once, cached and run by onnxruntime."""
    from sadtalker_rt import media
    from sadtalker_rt.cli import main

    monkeypatch.setenv("SADTALKER_RT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "talk.mp4"
    try:
        code = main(["run", str(assets_dir / "art_0.png"), str(assets_dir / "RD_Radio31_000.wav"), "-o", str(out),
              "--synthetic-weights", "--duration", "0.04", "--backend", "onnxruntime", "--enhancer", "gfpgan",
              "--batch-size", "1", "--quiet"])
    except SystemExit as exit_:
        code = exit_.code
    assert not code
    info = media.probe_video(out)
    assert (info["width"], info["height"]) == (512, 512) and info["audio_codec"] == "aac"
    assert len(list((tmp_path / "cache" / "enhancer-graphs").iterdir())) == 1


def test_tracked_points_follow_the_head_and_fall_back_when_lost(assets_dir):
    import cv2

    from sadtalker_rt import media
    from sadtalker_rt.runtime import face_restore as fr
    from sadtalker_rt.runtime import landmarks
    from sadtalker_rt.runtime import preprocess as prep
    from sadtalker_rt.runtime.enhancer import FaceEnhancer

    class Identity:
        def runner(self, stage):
            class R:
                infer = staticmethod(lambda feeds: {"image": feeds["face"]})
            return R()

    photo = media.load_image(assets_dir / "art_0.png")
    frame, _ = prep.crop_source(photo, landmarks.detect(photo).landmarks, "crop", 256)
    source = landmarks.detect(frame).landmarks
    moved = cv2.warpAffine(frame, np.float32([[1, 0, 6], [0, 1, 4]]), (256, 256), borderMode=cv2.BORDER_REFLECT)
    enhancer = FaceEnhancer(Identity(), parse=False)
    enhancer.track_from(source)
    enhancer([moved], [0], "seeded")
    truth = fr.align_affine(fr.points_from_landmarks68(source) + np.float32([6, 4]))
    assert np.abs(enhancer.alignment.affine[:, 2] - truth[:, 2]).max() < 4          # within 2 px of the moved face
    eyes = np.linalg.norm(np.subtract(*fr.points_from_landmarks68(source)[:2]))
    for _ in range(3):      # frames without a face: the points stay near the avatar's, they do not run away
        enhancer([np.full_like(frame, 128)], [1], "seeded")
        drift = np.linalg.norm(fr.points_from_landmarks68(enhancer.alignment.landmarks) - fr.points_from_landmarks68(source), axis=1)
        assert drift.max() <= 0.35 * eyes


def test_enhanced_video_is_twice_the_size_with_sound(tmp_path, assets_dir):
    """The pipeline's enhancer wiring, frames to video, with an identity restorer standing in for GFPGAN (the
    networks themselves: the heavy run test in test_enhancer.py and the graph tests above)."""
    from sadtalker_rt import media
    from sadtalker_rt.models.checkpoints import WeightSource
    from sadtalker_rt.runtime.enhancer import FaceEnhancer
    from sadtalker_rt.runtime.pipeline import Options, TalkingHead

    class Identity:
        def __init__(self):
            self.calls = []

        def runner(self, stage):
            def infer(feeds):
                self.calls.append((stage, feeds["face"].shape[0]))
                if stage == "enhancer":
                    return {"image": feeds["face"]}
                return {"parse": np.ones((feeds["face"].shape[0], 512, 512), np.int64)}

            class R:
                pass
            R.infer = staticmethod(infer)
            return R()

    head = TalkingHead.from_weights(WeightSource(synthetic_seed=0), size=256)
    stand_in = Identity()
    head.enhancer = FaceEnhancer(stand_in, parse=True)
    avatar = head.prepare_avatar(assets_dir / "art_0.png", preprocess="crop")
    out = head.write_video(avatar, assets_dir / "RD_Radio31_000.wav", tmp_path / "x.mp4",
                           Options(enhancer="gfpgan", enhancer_noise="seeded", duration=0.08, batch_size=2))
    info = media.probe_video(out)
    assert (info["width"], info["height"], info["frames"]) == (512, 512, 2) and info["audio_codec"] == "aac"
    assert stand_in.calls == [("enhancer", 2), ("face_parse", 2)]
