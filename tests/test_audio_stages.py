"""Audio features, ExpNet, Audio2Pose and the coefficient post-processing."""
from __future__ import annotations

import ast
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sadtalker_rt.runtime import audio_features as audio
from sadtalker_rt.runtime import coeffs
from sadtalker_rt import stages
from sadtalker_rt.conformance import run_directory
from sadtalker_rt.errors import WeightsError
from sadtalker_rt.models import audio2exp, audio2pose
from sadtalker_rt.models.synthetic import synthetic_state_dict

AUDIO_STAGES = {"audio_features", "audio2exp", "audio2pose", "semantic_windows", "pose_smoothing"}
MODELS = {"audio2exp": audio2exp, "audio2pose": audio2pose}


@pytest.fixture(scope="module")
def pose_model():
    return audio2pose.build(synthetic_state_dict(audio2pose.official_template(), 5), "synthetic audio2pose")


# --- conformance and the official key layout ---

def test_conformance_cases_pass(conformance_dir):
    results = run_directory(conformance_dir, stages=AUDIO_STAGES)
    assert {r.stage for r in results} == AUDIO_STAGES
    failed = [f"{r.stage}/{r.case}: {r.error or r.worst_rel}" for r in results if not r.passed]
    assert not failed, failed


@pytest.mark.parametrize("name", sorted(MODELS))
def test_official_template_matches_safetensors_keys(conformance_dir, name):
    prefix = name + "."
    expected = {}
    for line in (conformance_dir / "manifest" / "official_safetensors_keys.tsv").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        if key.startswith(prefix):
            expected[key[len(prefix):]] = (tuple(ast.literal_eval(shape)), dtype.replace("torch.", ""))
    assert MODELS[name].official_template() == expected


@pytest.mark.parametrize("name", sorted(MODELS))
def test_build_refuses_missing_and_unknown_keys(name):
    module = MODELS[name]
    state = synthetic_state_dict(module.official_template(), 0)
    missing = dict(state)
    del missing["audio_encoder.3.conv_block.0.weight" if name == "audio2exp" else "netG.decoder.MLP.L1.bias"]
    with pytest.raises(WeightsError, match="missing 1 keys .*(conv_block.0.weight|MLP.L1.bias)"):
        module.build(missing, "test file")
    extra = dict(state, **{"netG.decoder.extra_head.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match=r"test file .*unexpected 1 keys \(netG.decoder.extra_head.weight\)"):
        module.build(extra, "test file")


def test_audio2pose_drops_only_training_keys():
    state = synthetic_state_dict(audio2pose.official_template(), 0)
    kept = audio2pose.checkpoint_filter_fn(state)
    dropped = set(state) - set(kept)
    assert dropped and all(k.startswith(("netG.encoder.", "netD_motion.")) for k in dropped)
    assert set(kept) == set(audio2pose.Audio2Pose().state_dict())


# --- audio features ---

def _librosa_mel(wav: np.ndarray) -> np.ndarray:
    librosa = pytest.importorskip("librosa")
    from scipy.signal import lfilter

    stft = librosa.stft(y=lfilter([1, -0.97], [1], wav), n_fft=800, hop_length=200, win_length=800)
    basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    db = 20 * np.log10(np.maximum(1e-5, basis @ np.abs(stft))) - 20
    return np.clip(8 * ((db + 100) / 100) - 4, -4, 4).T.astype(np.float32)


@pytest.mark.parametrize("n_samples", [640, 6400 + 123, 16000])
def test_mel_matches_librosa(n_samples):
    wav = (0.3 * np.random.default_rng(n_samples).standard_normal(n_samples)).astype(np.float32)
    ours, ref = audio.melspectrogram(wav), _librosa_mel(wav)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-4


@settings(max_examples=40, deadline=None)
@given(n_samples=st.integers(0, 40 * 640))
def test_feature_shapes(n_samples):
    wav = np.random.default_rng(n_samples).uniform(-1, 1, n_samples).astype(np.float32)
    mel, windows = audio.audio_features(wav)
    T = audio.frame_count(n_samples)
    assert T == n_samples // 640
    assert mel.shape == (1 + 640 * T // 200, 80) and mel.dtype == np.float32
    assert windows.shape == (T, 80, 16)
    assert np.all(np.abs(mel) <= 4)


@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, 300), T=st.integers(0, 120))
def test_mel_windows_replicate_edges(M, T):
    mel = np.arange(M * 80, dtype=np.float32).reshape(M, 80)
    windows = audio.mel_windows(mel, T)
    assert windows.shape == (T, 80, 16)
    for i in {0, 1, T // 2, T - 1} & set(range(T)):
        start = int(80 * ((i - 2) / 25))          # the official expression, truncating toward zero
        expected = mel[[min(max(j, 0), M - 1) for j in range(start, start + 16)]].T
        np.testing.assert_array_equal(windows[i], expected)


# --- blinks, smoothing, windows ---

@settings(max_examples=60, deadline=None)
@given(T=st.one_of(st.sampled_from([0, 1, 20, 21, 22, 23]), st.integers(0, 600)), seed=st.integers(0, 2**32 - 1))
def test_blink_sequence_bounds_and_seed(T, seed):
    ratio = coeffs.blink_sequence(T, np.random.default_rng(seed))
    assert ratio.shape == (T, 1) and ratio.dtype == np.float32
    assert np.all((ratio >= 0) & (ratio <= 1))
    assert set(np.unique(ratio)) <= {0.0, *coeffs.BLINK_PROFILE}
    if T <= 21:
        assert not ratio.any()
    else:
        assert ratio[-1, 0] == 0                   # a blink ends at least one frame before the end
    np.testing.assert_array_equal(ratio, coeffs.blink_sequence(T, np.random.default_rng(seed)))


@pytest.mark.parametrize("T", range(1, 31))
def test_smoothing_keeps_shape(T):
    pose = np.random.default_rng(T).standard_normal((1, T, 6)).astype(np.float32)
    smoothed = coeffs.smooth_pose(pose)
    assert smoothed.shape == pose.shape and smoothed.dtype == pose.dtype
    assert coeffs.smooth_pose(pose[0]).shape == (T, 6)
    if T < 3:
        np.testing.assert_array_equal(smoothed, pose)


def test_smoothing_keeps_a_parabola():
    t = np.arange(40, dtype=np.float64)[:, None]
    pose = np.repeat(0.01 * t ** 2 - 0.3 * t + 2, 6, axis=1)
    np.testing.assert_allclose(coeffs.smooth_pose(pose), pose, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(T=st.one_of(st.sampled_from([1, 2, 21]), st.integers(1, 80)), full=st.booleans(), still=st.booleans(),
       scale=st.floats(0.0, 3.0))
def test_semantic_windows(T, full, still, scale):
    rng = np.random.default_rng(T)
    generated = rng.standard_normal((T, 70)).astype(np.float32)
    source = rng.standard_normal((1, 73)).astype(np.float32)
    src, tgt = coeffs.semantic_windows(generated, source, full=full, still=still, expression_scale=scale)
    C = 73 if full else 70
    assert src.shape == (1, C, 27) and tgt.shape == (T, C, 27)
    np.testing.assert_array_equal(src[0], np.repeat(source[0, :C, None], 27, axis=1))
    np.testing.assert_allclose(tgt[:, :64, 13], generated[:, :64] * np.float32(scale), rtol=1e-6)
    np.testing.assert_array_equal(tgt[0, :, 0], tgt[0, :, 13])             # edges replicate
    if still:
        np.testing.assert_array_equal(tgt[:, 64:, :], np.broadcast_to(source[0, 64:C, None], (T, C - 64, 27)))
    else:
        np.testing.assert_array_equal(tgt[:, 64:70, 13], generated[:, 64:70])


def test_full_windows_need_crop_coefficients():
    with pytest.raises(ValueError, match="73"):
        coeffs.semantic_windows(np.zeros((5, 70), np.float32), np.zeros((1, 70), np.float32), full=True,
                                still=False, expression_scale=1.0)


# --- Audio2Pose chunking ---

@pytest.mark.parametrize("T", [1, 2, 21, 32, 33, 34, 65, 75, 97])
def test_pose_chunks_cover_every_frame_once(T):
    chunks = stages.pose_chunks(T)
    assert len(chunks) == math.ceil((T - 1) / 32)
    covered = [i for c in chunks for i in range(c.stop - c.keep, c.stop)]
    assert covered == list(range(T - 1))
    assert all(c.stop - c.start == min(32, T - 1) for c in chunks)


@pytest.mark.parametrize("T", [1, 9, 33])
def test_generate_short_sequences_pad_the_embedding(pose_model, T):
    rng = np.random.default_rng(T)
    mels = torch.from_numpy(rng.standard_normal((1, T, 1, 80, 16)).astype(np.float32))
    ref = torch.from_numpy(rng.standard_normal((1, 1, 70)).astype(np.float32))
    noise = torch.from_numpy(rng.standard_normal((1, max(1, len(stages.pose_chunks(T))), 64)).astype(np.float32))
    with torch.inference_mode():
        pose = pose_model.generate(mels, ref, 7, noise)
        assert pose.shape == (1, T, 6)
        torch.testing.assert_close(pose[:, 0], ref[:, 0, 64:])            # frame 0: motion exactly 0
        if T == 1:
            return
        # The official path: encode the frames there are, front-pad the embedding with its first row.
        emb = pose_model.audio_encoder(mels[:, 1:][:, -32:])
        emb = torch.cat([emb[:, :1].repeat(1, 32 - emb.shape[1], 1), emb], dim=1)
        motion = pose_model.netG.decoder(emb, ref[:, 0, 64:], torch.tensor([7]), noise[:, -1])
        torch.testing.assert_close(pose[:, -((T - 1) % 32 or 32):], ref[:, :, 64:] + motion[:, -((T - 1) % 32 or 32):])


def test_decoder_stage_matches_chunk_forward(pose_model):
    rng = np.random.default_rng(0)
    args = (torch.from_numpy(rng.standard_normal((1, 32, 1, 80, 16)).astype(np.float32)),
            torch.from_numpy(rng.standard_normal((1, 6)).astype(np.float32)),
            torch.tensor([45]), torch.from_numpy(rng.standard_normal((1, 64)).astype(np.float32)))
    stage = audio2pose.PoseDecoderStage(pose_model).eval()
    with torch.inference_mode():
        torch.testing.assert_close(stage(*args), pose_model(*args), rtol=0, atol=0)
        assert stage(*args).shape == (1, 32, 6)


def test_expnet_accepts_64_or_70_reference_columns():
    model = audio2exp.build(synthetic_state_dict(audio2exp.official_template(), 3), "synthetic audio2exp")
    rng = np.random.default_rng(1)
    mels = torch.from_numpy(rng.standard_normal((1, 12, 1, 80, 16)).astype(np.float32))
    ref = torch.from_numpy(rng.standard_normal((1, 12, 70)).astype(np.float32))
    ratio = torch.from_numpy(coeffs.blink_sequence(12, rng)[None])
    with torch.inference_mode():
        whole = model(mels, ref, ratio)
        torch.testing.assert_close(whole, model(mels, ref[..., :64], ratio))
        # The official loop runs 10 frames at a time; frames are independent.
        torch.testing.assert_close(whole[:, :10], model(mels[:, :10], ref[:, :10], ratio[:, :10]))
    assert whole.shape == (1, 12, 64)
