"""Streaming: audio in as it arrives, frames out as soon as every input they depend on has arrived.

``MotionStream`` computes the motion coefficients incrementally, and the offline path
(``TalkingHead.motion``) is the same object fed the whole audio at once, so both run the same stage calls on
the same inputs. What a frame waits for, stage by stage (T: the utterance's frames, unknown until the end;
only the first ``n // 640`` frames of the samples heard so far are sure to belong to it):

- mel frame m: samples up to 200 m + 400 (its centred 800-sample window);
- mel window of frame i (16 mel frames from trunc(3.2 (i - 2))): about 3.3 frames of audio beyond frame i;
- blink ratio of frame f: the utterance has more than f + 6 and 21 frames (a blink never ends on the last);
- ExpNet: whole groups of 32 frames (``EXP_GROUP``, aligned at multiples of 32, the offline grouping too);
- PoseVAE: whole 32-frame chunks (frames 32k + 1 .. 32k + 32), the last partial chunk only at the end;
- Savitzky-Golay smoothing: 6 raw poses after the frame;
- renderer: the 13 following frames' coefficients (semantic radius 13), and a whole batch of frames.

The options that reshape the motion add their own waits (``FrameStream``):

- ``ref_eyeblink``/``ref_pose``: the reference video's row of the frame, decoded as the audio arrives
  (``reference_video.ReferenceTrack``): at once for a frame with a face; a frame without one waits until its
  nearest face is known to lie within the utterance; a video that is shorter than the audio loops;
- free view: nothing for fixed angles (one value); a list of several degrees is spread over the whole video,
  so every frame after the first waits for the end of the audio;
- the enhancer: nothing (it runs on each rendered batch, in frame order, as offline).

Every stage runs on the same groups of frames as offline (ExpNet groups, pose chunks, renderer batches are
aligned at fixed frame indices, never at chunk boundaries), so the frames are the offline frames bit for
bit, whatever the chunk sizes. Randomness has per-purpose streams (``coeffs.blink_generator``,
``coeffs.pose_latent``) that do not depend on the audio length.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Callable, ContextManager, Iterable, Iterator, Optional, Union

import numpy as np

from ..errors import InputError
from ..stages import (EXPRESSION, FPS, POSE_CHUNK, SAMPLES_PER_FRAME, SEMANTIC_RADIUS, PoseChunk, is_full,
                      pose_chunks)
from . import audio_features as af
from .coeffs import SMOOTH_WINDOW, BlinkTrack, blink_generator, pose_latent, smooth_pose_rows, target_rows
from .frames import Frame, Motion, to_uint8
from .overrides import add_ref_pose
from .reference_video import LoopedRows

EXP_GROUP = POSE_CHUNK            # frames per ExpNet call, aligned at multiples of 32
BLINK_LOOKAHEAD = 6               # a blink of 5 frames must end before the last frame
NO_BLINK_FRAMES = 21              # utterances of up to 21 frames have no blinks
Chunk = Union[np.ndarray, bytes, bytearray, memoryview]
Turn = Callable[[], ContextManager]


class _Rows:
    """A growing array of rows (amortised doubling)."""

    def __init__(self, width: tuple, dtype=np.float32):
        self.data = np.empty((64, *width), dtype)
        self.n = 0

    def append(self, rows: np.ndarray) -> None:
        need = self.n + len(rows)
        if need > len(self.data):
            grown = np.empty((max(need, 2 * len(self.data)), *self.data.shape[1:]), self.data.dtype)
            grown[:self.n] = self.data[:self.n]
            self.data = grown
        self.data[self.n:need] = rows
        self.n = need

    def view(self) -> np.ndarray:
        return self.data[:self.n]


def pcm_to_float(chunk: Chunk) -> np.ndarray:
    """16 kHz mono PCM as float32: bytes are signed 16-bit little-endian, int16 arrays are scaled by 1/32768,
    float arrays are taken as they are."""
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        raw = bytes(chunk)
        if len(raw) % 2:
            raise InputError(f"a PCM chunk of {len(raw)} bytes is not whole 16-bit samples.")
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    array = np.asarray(chunk)
    if array.ndim != 1:
        raise InputError(f"a PCM chunk must be one channel (1-D samples), not shape {array.shape}.")
    if array.dtype == np.int16:
        return array.astype(np.float32) / 32768.0
    if array.dtype.kind != "f":
        raise InputError(f"PCM chunks are int16 or float samples, not {array.dtype}.")
    return array.astype(np.float32, copy=False)


class MotionStream:
    """Motion coefficients of an utterance, computed as its audio arrives.

    ``feed`` samples, then ``finish``; after each call ``renderable`` frames have final renderer inputs
    (``target_windows``). ``infer`` runs one stage call (a lock may wrap it so sessions take turns).
    """

    def __init__(self, infer: Callable[..., dict], avatar, options, progress=None, name: str = "the audio",
                 references: Optional[dict] = None):
        """``references``: per option (``ref_eyeblink``, ``ref_pose``) the reference video's rows: its (N, 73)
        coefficients, or a ``reference_video.ReferenceTrack`` that decodes it as the audio arrives."""
        options.validate()
        self.infer, self.options, self.name = infer, options, name
        self.references = {k: LoopedRows(v) if isinstance(v, np.ndarray) else v
                           for k, v in (references or {}).items() if v is not None}
        self.progress = progress or (lambda stage, done, total: None)
        self.source_coeffs = avatar.source_coeffs
        self.full = is_full(avatar.preprocess)
        self.ref = avatar.source_coeffs[0, :70].astype(np.float32)
        self.limit = None if options.duration is None else int(round(options.duration * af.SAMPLE_RATE))
        self.wav = _Rows(())
        self.ended = False
        self.mel = _Rows((af.N_MELS,))
        self.blinks = BlinkTrack(blink_generator(options.seed))
        self.exp = _Rows((64,))
        self.pose_raw = _Rows((6,))
        self.pose_raw.append(self.ref[None, 64:70] + np.zeros((1, 6), np.float32))   # frame 0: motion 0
        self.pose = _Rows((6,))
        self.chunks_done = 0
        self.coeffs = _Rows((70,))
        self.target = _Rows((73 if self.full else 70,))

    # -- input --------------------------------------------------------------------------------------
    @property
    def frames_known(self) -> int:
        """Frames sure to be in the utterance (all of them once it has ended)."""
        return self.wav.n // SAMPLES_PER_FRAME

    @property
    def total(self) -> Optional[int]:
        return self.frames_known if self.ended else None

    def feed(self, samples: np.ndarray, last: bool = False) -> None:
        if self.ended:
            raise RuntimeError("the utterance has ended")
        samples = pcm_to_float(samples)
        if self.limit is not None:
            samples = samples[:max(0, self.limit - self.wav.n)]
        self.wav.append(samples)
        if last or (self.limit is not None and self.wav.n >= self.limit):
            self._end()
        self._advance()

    def finish(self) -> None:
        if not self.ended:
            self._end()
            self._advance()

    def _end(self) -> None:
        self.ended = True
        if self.frames_known < 1:
            raise InputError(f"{self.name} is shorter than one video frame ({self.wav.n} samples at 16 kHz, "
                             f"{self.wav.n / 16:.1f} ms < 40 ms).")

    # -- stages -------------------------------------------------------------------------------------
    def _advance(self) -> None:
        self._mel()
        windows = self._windows_final()
        self._expression(windows)
        self._pose_chunks(windows)
        self._smooth()
        self._targets()

    def _mel(self) -> None:
        T = self.total
        if T is not None:
            target, length = af.mel_frame_count(T * SAMPLES_PER_FRAME), T * SAMPLES_PER_FRAME
        else:
            known = self.frames_known * SAMPLES_PER_FRAME
            target = (known - af.N_FFT // 2) // af.HOP + 1 if known >= af.N_FFT // 2 else 0
            length = self.wav.n     # later samples only reach frames that are not final yet
        wav = self.wav.view()
        while self.mel.n < target:
            block = self.mel.n // af.MEL_BLOCK
            rows = af.mel_block(wav, length, block)
            self.mel.append(rows[self.mel.n - block * af.MEL_BLOCK:min(target - block * af.MEL_BLOCK, af.MEL_BLOCK)])

    def _windows_final(self) -> int:
        """Frames whose 16-frame mel window is final."""
        if self.ended:
            return self.total
        count = getattr(self, "_windows", 0)
        while af.window_start(count) + af.MEL_STEP <= self.mel.n:
            count += 1
        self._windows = count
        return count

    def windows(self, start: int, stop: int) -> np.ndarray:
        return af.window_rows(self.mel.view(), af.window_starts(stop, start)).astype(np.float32)

    def _blinks_final(self) -> int:
        if self.ended:
            return self.total
        known = self.frames_known
        return known - BLINK_LOOKAHEAD if known > NO_BLINK_FRAMES else 0

    def _expression(self, windows: int) -> None:
        T = self.total
        eyeblink = self.references.get("ref_eyeblink")
        # --ref-eyeblink: the video's expression and no blinks (spec 3.3), so its rows replace the blinks' wait
        ready = min(windows, self._blinks_final() if eyeblink is None else eyeblink.ready(self.frames_known, T))
        while True:
            start = self.exp.n
            stop = start + EXP_GROUP if T is None else min(start + EXP_GROUP, T)
            if stop <= start or stop > ready:
                return
            if eyeblink is None:
                # the blink ratios assume the shortest utterance consistent with what is known; final either way
                blink = self.blinks.values(T if T is not None else self.frames_known, start, stop)
                ref_exp = np.tile(self.ref[:64], (stop - start, 1))
            else:
                blink = np.zeros((stop - start, 1), np.float32)
                ref_exp = eyeblink.rows(start, stop)[:, EXPRESSION]
            exp = self.infer("audio2exp", indiv_mels=self.windows(start, stop)[:, None],
                             ref_exp=np.ascontiguousarray(ref_exp), blink=blink)["exp"]
            self.exp.append(exp)
            if T is not None:
                self.progress("audio2exp", stop, T)

    def _pose_chunks(self, windows: int) -> None:
        T = self.total
        if T is None:
            chunks = []
            k = self.chunks_done
            while windows >= POSE_CHUNK * (k + 1) + 1:       # audio frames 32k + 1 .. 32k + 32 are final
                chunks.append(PoseChunk(k * POSE_CHUNK, (k + 1) * POSE_CHUNK, POSE_CHUNK))
                k += 1
        else:
            chunks = pose_chunks(T)[self.chunks_done:]
        total = None if T is None else len(pose_chunks(T))
        for chunk in chunks:
            window = self.windows(1 + chunk.start, 1 + chunk.stop)     # audio after the reference frame
            if len(window) < POSE_CHUNK:   # fewer than 32 frames in all: repeat the first window
                window = np.concatenate([np.repeat(window[:1], POSE_CHUNK - len(window), axis=0), window])
            out = self.infer("audio2pose", indiv_mels=window[:, None], ref_pose=self.ref[None, 64:70],
                             pose_style=np.array([self.options.pose_style], np.int64),
                             noise=pose_latent(self.options.seed, self.chunks_done))["motion"]
            self.pose_raw.append(self.ref[None, 64:70] + out[POSE_CHUNK - chunk.keep:])
            self.chunks_done += 1
            if total:
                self.progress("audio2pose", self.chunks_done, total)

    def _smooth(self) -> None:
        T = self.total
        raw = self.pose_raw.n
        ready = T if T is not None else (raw - SMOOTH_WINDOW // 2 if raw >= SMOOTH_WINDOW else 0)
        if ready > self.pose.n:
            self.pose.append(smooth_pose_rows(self.pose_raw.view(), self.pose.n, ready, T))

    def _targets(self) -> None:
        ready = min(self.exp.n, self.pose.n)
        ref_pose = self.references.get("ref_pose")
        if ref_pose is not None and ready > self.coeffs.n:
            ready = min(ready, ref_pose.ready(self.frames_known, self.total))
        if ready > self.coeffs.n:
            start = self.coeffs.n
            rows = np.concatenate([self.exp.view()[start:ready], self.pose.view()[start:ready]], axis=1)
            if ref_pose is not None:        # pose[t] += ref[t] - ref[0] (spec 5.4), row by row
                rows = add_ref_pose(rows, ref_pose.rows(start, ready), ref_pose.rows(0, 1)[0])
            self.coeffs.append(rows.astype(np.float32))
        # still: the pose is the source's, so the renderer need not wait for PoseVAE and smoothing
        ready = self.exp.n if self.options.still else self.coeffs.n
        if ready > self.target.n:
            start = self.target.n
            rows = np.zeros((ready - start, 70), np.float32)
            rows[:, :64] = self.exp.view()[start:ready]
            known = min(ready, self.coeffs.n) - start
            if known > 0:
                rows[:known] = self.coeffs.view()[start:start + known]
            self.target.append(target_rows(rows, self.source_coeffs, full=self.full, still=self.options.still,
                                           expression_scale=self.options.expression_scale))

    # -- output -------------------------------------------------------------------------------------
    @property
    def renderable(self) -> int:
        """Frames whose renderer inputs (27-frame semantic windows) are final."""
        if self.ended:
            return self.total
        return max(0, self.target.n - SEMANTIC_RADIUS)

    def target_windows(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, C, 27) semantics of frames start..stop-1 (edges replicate the first / last frame)."""
        offsets = np.arange(-SEMANTIC_RADIUS, SEMANTIC_RADIUS + 1)
        index = np.clip(np.arange(start, stop)[:, None] + offsets[None, :], 0, self.target.n - 1)
        return np.ascontiguousarray(self.target.view()[index].transpose(0, 2, 1))

    def result(self):
        """The offline ``Motion`` of the whole utterance (after ``finish``)."""

        T = self.total
        return Motion(self.coeffs.view()[:T], self.wav.view()[:T * SAMPLES_PER_FRAME],
                      af.MelWindows(self.mel.view(), T))


class FrameStream:
    """Push audio chunks, get the frames that became final: ``push`` then ``close``, each an iterator.

    Takes every option ``generate`` takes; ``notes`` holds the lines about the reference videos once the
    audio has ended."""

    def __init__(self, head, avatar, options, turn: Optional[Turn] = None):
        from ..stages import mapping_stage
        from .compose import Compositor
        from .scheduler import FramePipeline

        options.validate()
        self.turn = turn or contextlib.nullcontext
        self.options = options
        self.notes: list[str] = []
        infer = self._infer_with(head)
        self.tracks: dict[str, object] = {}
        references = self._references(head, avatar, options, infer)
        self.motion = MotionStream(infer, avatar, options, references=references)
        self.view = options.free_view()
        features = avatar.features
        if self.view.active:        # given head angles: the free-view mapping stage takes them per frame
            features = {**avatar.features, "angle_given": self.view.angles(1)[1]}
        self.pipeline = FramePipeline(head.backend.executor(), features, head.size, options.batch_size,
                                      mapping=mapping_stage(avatar.preprocess, free_view=self.view.active))
        self.compositor = Compositor(avatar)
        self.enhance = head.frame_enhancer(avatar, self.compositor, options)
        self.rendered = 0

    def _infer_with(self, head):
        def infer(stage: str, **feeds):
            with self.turn():
                return head.infer(stage, **feeds)
        return infer

    def _references(self, head, avatar, options, infer) -> dict:
        """Arrays as they are; each video file opened once and decoded as the audio arrives. The crop box
        (the first face) is found now, so a video without a face is refused before any audio."""
        from pathlib import Path

        from ..media.video_input import iter_video_frames
        from .reference_video import ReferenceTrack

        def regress(aligned: np.ndarray) -> np.ndarray:
            return infer("face3d_recon", aligned_image=aligned)["coeffs"]

        found = {}
        for option in ("ref_eyeblink", "ref_pose"):
            reference = getattr(options, option)
            if reference is None or isinstance(reference, np.ndarray):
                found[option] = reference
                continue
            key = str(Path(reference).resolve())
            if key not in self.tracks:
                self.tracks[key] = ReferenceTrack(iter_video_frames(reference), avatar.preprocess, head.size,
                                                  regress, str(reference))
                try:
                    self.tracks[key].ready(0, None)
                except BaseException:
                    self._close_tracks()
                    raise
            found[option] = self.tracks[key]
        return found

    def _close_tracks(self) -> None:
        for track in self.tracks.values():
            track.close()

    @property
    def ended(self) -> bool:
        return self.motion.ended

    def push(self, chunk: Chunk) -> Iterator:
        if not self.motion.ended:          # audio past --duration is ignored
            self.motion.feed(chunk)
        return self._frames()

    def close(self) -> Iterator:
        try:
            self.motion.finish()
            T = self.motion.total
            for track in self.tracks.values():
                self.notes.extend(track.complete(T).notes)
        finally:
            self._close_tracks()
        return self._frames()

    def _renderable(self) -> int:
        ready = self.motion.renderable
        if self.view.active:
            ready = min(ready, self.view.final_frames(self.motion.frames_known, self.motion.total))
        return ready

    def _frames(self) -> Iterator:
        bs, motion = self.options.batch_size, self.motion
        while True:
            ready = self._renderable()
            start = self.rendered
            stop = min(start + bs, ready)
            if stop <= start or (stop - start < bs and not motion.ended):
                return
            semantics = motion.target_windows(start, stop)
            per_frame = None
            if self.view.active:
                per_frame = {"angles": self.view.angles_between(start, stop, motion.total)[0]}
            with self.turn():
                images = self.pipeline.render_batch(semantics, per_frame)
            self.rendered = stop
            frames = [self.compositor(to_uint8(images[i])) for i in range(stop - start)]
            if self.enhance is not None:    # the batches are offline's, so tracking and noise see the same frames
                with self.turn():
                    frames = self.enhance(frames, list(range(start, stop)))
            for i, image in enumerate(frames):
                yield Frame(start + i, (start + i) / FPS, image)


def stream(head, avatar, chunks: Union[Iterable[Chunk], AsyncIterator[Chunk]], options,
           turn: Optional[Turn] = None):
    """Frames of ``chunks`` (16 kHz mono PCM of any sizes) as soon as they are final; an async iterator of
    chunks gives an async iterator of frames (the work runs in a worker thread)."""
    if hasattr(chunks, "__aiter__"):      # the session starts in a worker thread too (it may open a reference video)
        return _astream(lambda: FrameStream(head, avatar, options, turn), chunks)
    return _stream(FrameStream(head, avatar, options, turn), chunks)


def _stream(session: FrameStream, chunks: Iterable[Chunk]) -> Iterator:
    for chunk in chunks:
        yield from session.push(chunk)
        if session.ended:
            break
    yield from session.close()


async def _astream(start: Callable[[], FrameStream], chunks: AsyncIterator[Chunk]):
    session = await asyncio.to_thread(start)
    done = object()
    async for chunk in chunks:
        frames = await asyncio.to_thread(session.push, chunk)
        while (frame := await asyncio.to_thread(next, frames, done)) is not done:
            yield frame
        if session.ended:
            break
    frames = await asyncio.to_thread(session.close)
    while (frame := await asyncio.to_thread(next, frames, done)) is not done:
        yield frame
