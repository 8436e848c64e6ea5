"""Audio features of the official pipeline: the Wav2Lip mel spectrogram and its per-frame windows.

numpy only (the lean runtime imports this). Reproduces ``src/utils/audio.py`` with the Wav2Lip
hparams and the window loop of ``src/generate_batch.py`` (spec sections 2.2 to 2.4), with the
zero-padded centred STFT of librosa >= 0.10.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..stages import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
N_FFT = 800
HOP = 200
N_MELS = 80
FMIN, FMAX = 55.0, 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB = -100.0
REF_LEVEL_DB = 20.0
MAX_ABS = 4.0
MEL_STEP = 16                               # mel frames per video-frame window (200 ms)
MEL_FPS = SAMPLE_RATE / HOP                 # 80 mel frames per second


def _hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    logstep = np.log(6.4) / 27.0
    linear = hz / f_sp
    log_part = min_log_hz / f_sp + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep
    return np.where(hz >= min_log_hz, log_part, linear)


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_part = min_log_hz * np.exp(logstep * (np.maximum(mel, min_log_mel) - min_log_mel))
    return np.where(mel >= min_log_mel, log_part, f_sp * mel)


@lru_cache(maxsize=1)
def mel_filterbank() -> np.ndarray:
    """(80, 401) float32 triangular filters, Slaney mel scale and Slaney area normalisation.

    The same matrix as ``librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)``,
    including librosa's order of rounding (filters stored as float32, then scaled in place).
    """
    fft_freqs = np.fft.rfftfreq(N_FFT, d=1.0 / SAMPLE_RATE)
    mel_edges = np.linspace(_hz_to_slaney_mel(FMIN), _hz_to_slaney_mel(FMAX), N_MELS + 2)
    hz_edges = _slaney_mel_to_hz(mel_edges)
    widths = np.diff(hz_edges)
    ramps = hz_edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    weights *= (2.0 / (hz_edges[2:] - hz_edges[:-2]))[:, None]
    weights.setflags(write=False)
    return weights


@lru_cache(maxsize=1)
def _filterbank64() -> np.ndarray:
    return np.ascontiguousarray(mel_filterbank().T.astype(np.float64))


@lru_cache(maxsize=1)
def _hann_window() -> np.ndarray:
    n = np.arange(N_FFT)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)      # periodic Hann, as librosa's STFT


MEL_BLOCK = 16                              # mel frames per transform call, aligned at multiples of 16


def mel_frame_count(n_samples: int) -> int:
    """Mel frames of a signal of ``n_samples``: one per hop, centred, 1 + n // 200."""
    return 1 + int(n_samples) // HOP


def mel_block(wav: np.ndarray, length: int, block: int) -> np.ndarray:
    """Normalised log-mel frames ``16 * block`` .. ``16 * block + 15`` as (16, 80) float32.

    ``wav`` holds at least the first ``length`` samples of the 16 kHz signal; the spectrogram is that of
    ``wav[:length]`` (pre-emphasis, centred frames with 400 zeros each side, as librosa >= 0.10). Every
    call transforms exactly 16 frames aligned at a multiple of 16, so a frame gets the same bits whether the
    whole signal is at hand (offline) or only its beginning (streaming, where rows past the samples known
    so far are computed from zeros and discarded by the caller).
    """
    first = block * MEL_BLOCK * HOP - N_FFT // 2            # first sample of the block's first frame
    span = (MEL_BLOCK - 1) * HOP + N_FFT
    lo, hi = max(first, 0), min(first + span, length, len(wav))
    segment = np.zeros(span, np.float64)
    if hi > lo:
        x = np.asarray(wav[max(lo - 1, 0):hi], dtype=np.float64)
        emphasized = x[1:] - PREEMPHASIS * x[:-1] if lo > 0 else np.concatenate([x[:1], x[1:] - PREEMPHASIS * x[:-1]])
        segment[lo - first:hi - first] = emphasized
    frames = np.lib.stride_tricks.sliding_window_view(segment, N_FFT)[::HOP]
    mel = np.abs(np.fft.rfft(frames * _hann_window(), axis=-1)) @ _filterbank64()
    min_level = np.exp(MIN_LEVEL_DB / 20 * np.log(10))
    db = 20 * np.log10(np.maximum(min_level, mel)) - REF_LEVEL_DB
    normalised = 2 * MAX_ABS * ((db - MIN_LEVEL_DB) / -MIN_LEVEL_DB) - MAX_ABS
    return np.clip(normalised, -MAX_ABS, MAX_ABS).astype(np.float32)


def melspectrogram(wav16k: np.ndarray) -> np.ndarray:
    """Normalised log-mel spectrogram (1 + len // 200, 80) float32 in [-4, 4], a block of 16 frames at a time
    (an hour of audio never holds its whole complex spectrogram)."""
    x = np.asarray(wav16k).reshape(-1)
    count = mel_frame_count(len(x))
    out = np.empty((-(-count // MEL_BLOCK) * MEL_BLOCK, N_MELS), np.float32)
    for block in range(len(out) // MEL_BLOCK):
        out[block * MEL_BLOCK:(block + 1) * MEL_BLOCK] = mel_block(x, len(x), block)
    return out[:count]


def frame_count(n_samples: int) -> int:
    """Video frames for ``n_samples`` of 16 kHz audio: floor(n / 640)."""
    return int(n_samples) // SAMPLES_PER_FRAME


def window_starts(T: int, first: int = 0) -> np.ndarray:
    """First mel frame of each video frame's window (frames first..T-1); truncation toward zero, so frame 0 -> -6."""
    i = np.arange(first, T, dtype=np.float64)
    return np.trunc(MEL_FPS * ((i - 2) / FPS)).astype(np.int64)


def window_start(i: int) -> int:
    """``window_starts``' value for frame i alone (the same float64 arithmetic)."""
    return int(np.trunc(MEL_FPS * ((np.float64(i) - 2) / FPS)))


def window_rows(mel: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(len(starts), 80, 16) windows of 16 mel frames from the given first frames, indices clamped to ``mel``."""
    index = np.clip(starts[:, None] + np.arange(MEL_STEP)[None, :], 0, mel.shape[0] - 1)
    return np.ascontiguousarray(mel[index].transpose(0, 2, 1))


class MelWindows:
    """The (T, 80, 16) per-frame windows of 16 mel frames, built per slice (indices clamped: edge replication)."""

    def __init__(self, mel: np.ndarray, T: int):
        self.mel = mel
        self.starts = window_starts(T)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, frames: slice) -> np.ndarray:
        return window_rows(self.mel, self.starts[frames])


def mel_windows(mel: np.ndarray, T: int) -> np.ndarray:
    """(T, 80, 16) windows of 16 mel frames, indices clamped to the spectrogram (edge replication)."""
    return MelWindows(mel, T)[:]


def audio_features(wav16k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Waveform -> (mel (M, 80), windows (T, 80, 16)), the waveform cut to whole video frames first."""
    wav = np.asarray(wav16k, dtype=np.float32).reshape(-1)
    T = frame_count(wav.shape[0])
    mel = melspectrogram(wav[: T * SAMPLES_PER_FRAME])
    return mel, mel_windows(mel, T)
