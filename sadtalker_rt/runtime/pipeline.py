"""The Python API: load models once, prepare an avatar once, generate frames from any audio.

    from sadtalker_rt.models.checkpoints import WeightSource
    from sadtalker_rt.runtime import pipeline
    head = pipeline.TalkingHead.from_weights(WeightSource(synthetic_seed=0))
    avatar = head.prepare_avatar("photo.png", preprocess="crop")
    for frame in head.generate(avatar, "speech.wav"):
        ...                      # frame.image: (H, W, 3) uint8 RGB, frame.timestamp in seconds
    head.write_video(avatar, "speech.wav", "out.mp4")

Every stage runs through a backend runner bound by name (see ``sadtalker_rt.stages``); the glue
between stages is numpy, so the same code drives torch, onnxruntime and TensorRT.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from ..errors import InputError, UsageError
from ..stages import (COEFFS, FPS, PREPROCESS_MODES, SAMPLE_RATE, SAMPLES_PER_FRAME, is_full, mapping_stage)
from .frames import Frame, Motion, to_uint8

Progress = Callable[[str, int, int], None]   # (stage, done, total)
ImageLike = Union[str, Path, np.ndarray]
AudioLike = Union[str, Path, np.ndarray]
ReferenceLike = Union[str, Path, np.ndarray]     # a video file, or its (N, 73) coefficients (TalkingHead.reference)


@dataclass
class Options:
    """What shapes the motion. Defaults are the official ones."""

    pose_style: int = 0            # PoseVAE class, 0..45
    expression_scale: float = 1.0
    still: bool = False            # keep the source head pose (and crop) for every frame
    seed: int = 0                  # blinks and pose latents; the same seed gives the same video
    batch_size: int = 2            # frames per renderer call
    duration: Optional[float] = None   # seconds of audio to use (None: all)
    enhancer: Optional[str] = None     # "gfpgan": restore the face, video at twice the size
    enhancer_noise: str = "fixed"      # GFPGAN decoder noise: fixed, seeded or fresh (sadtalker_rt.enhancer)
    enhancer_points: str = "track"     # alignment points per frame: track (from the previous frame) or fixed
    # Free view: integer degrees in -90..90 that replace the driving head angle, interpolated over the video.
    input_yaw: Optional[Sequence[int]] = None
    input_pitch: Optional[Sequence[int]] = None
    input_roll: Optional[Sequence[int]] = None
    ref_eyeblink: Optional[ReferenceLike] = None   # a video whose expression (blinks included) drives ExpNet's reference
    ref_pose: Optional[ReferenceLike] = None       # a video whose head motion is added to the generated pose

    def free_view(self):
        from .overrides import FreeView, parse_degrees

        return FreeView(*(parse_degrees(values, f"--input-{name}") for name, values in
                          (("yaw", self.input_yaw), ("pitch", self.input_pitch), ("roll", self.input_roll))))

    def validate(self) -> None:
        from .enhancer import check_enhancer

        check_enhancer(self.enhancer, self.enhancer_noise, self.enhancer_points)
        self.free_view()
        for option, reference in (("--ref-eyeblink", self.ref_eyeblink), ("--ref-pose", self.ref_pose)):
            if isinstance(reference, np.ndarray):
                if reference.ndim != 2 or len(reference) == 0 or reference.shape[1] < COEFFS \
                        or not np.isfinite(reference).all():
                    raise UsageError(f"{option} coefficients must be a finite (N, 73) array, not {reference.shape}.")
            elif reference is not None:
                from ..media.video_input import require_video_file

                require_video_file(reference, option)
        if not 0 <= self.pose_style <= 45:
            raise UsageError(f"--pose-style must be in 0..45, not {self.pose_style}.")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, not {self.batch_size}.")
        if not np.isfinite(self.expression_scale):
            raise UsageError("--expression-scale must be a finite number.")
        if self.duration is not None and not self.duration > 0:
            raise UsageError(f"--duration must be positive, not {self.duration}.")


@dataclass
class Avatar:
    """Everything that depends only on the photo, computed once."""

    size: int
    preprocess: str
    source_frame: np.ndarray           # (S, S, 3) uint8, the renderer's source image
    source_coeffs: np.ndarray          # (1, 73): exp 64, angle 3, trans 3, crop (s, tx, ty)
    crop_info: object                  # geometry for aspect restore and paste-back
    original: Optional[np.ndarray]     # the full photo, kept for full/extfull paste-back
    features: dict = field(default_factory=dict)   # kp_canonical, kp_source, feature_3d, source_compressed
    notes: list = field(default_factory=list)
    face_points: Optional[np.ndarray] = None   # (5, 2) eyes, nose, mouth corners in the source frame (enhancer)
    face_landmarks: Optional[np.ndarray] = None   # (68, 2) dlib landmarks in the source frame (enhancer tracking)

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the video."""
        if is_full(self.preprocess):
            h, w = self.original.shape[:2]
            return w, h
        if self.preprocess == "resize":
            w, h = self.crop_info.tight_size
            return self.size, max(2, int(self.size * h / w))
        return self.size, self.size


def _noop(stage: str, done: int, total: int) -> None:
    return None


class TalkingHead:
    def __init__(self, backend, size: int = 256, enhancer=None):
        self.backend = backend
        self.size = size
        self.enhancer = enhancer           # sadtalker_rt.enhancer.FaceEnhancer, for Options(enhancer="gfpgan")
        # Enhance batch k in a worker thread while batch k + 1 renders; None: the executor's choice.
        self.enhance_ahead: Optional[bool] = None

    @classmethod
    def from_weights(cls, weights, size: int = 256, device: str = "cpu", precision: str = "fp32",
                     cuda_graphs: bool = False, enhancer_weights=None) -> "TalkingHead":
        """``enhancer_weights``: a ``sadtalker_rt.models.enhancer_weights.EnhancerWeights`` to allow ``--enhancer``."""
        from .backends import open_backend

        head = cls(open_backend("torch", weights=weights, size=size, device=device, precision=precision,
                                cuda_graphs=cuda_graphs), size)
        if enhancer_weights is not None:
            head.enable_enhancer(enhancer_weights, device=device)
        return head

    def enable_enhancer(self, enhancer_weights, device: str = "cpu") -> None:
        """Load GFPGAN (and the parsing network where present) for ``Options(enhancer="gfpgan")``; the
        enhancer stages run on the torch backend whatever backend renders."""
        from .backends import open_backend
        from .enhancer import FaceEnhancer

        opened = open_backend("torch", weights=enhancer_weights, size=self.size, device=device)
        gfpgan = opened.subnetwork("gfpgan")
        if enhancer_weights.has("parsenet"):
            opened.subnetwork("parsenet")          # a wrong file is refused before any rendering
        self.enhancer = FaceEnhancer(opened, [n.numpy() for n in gfpgan.stylegan_decoder.stored_noise()],
                                     parse=enhancer_weights.has("parsenet"))

    @classmethod
    def from_engines(cls, engines: Path, backend: str = "onnxruntime", device: str = "cpu",
                     cuda_graphs: bool = False) -> "TalkingHead":
        from .backends import open_backend

        opened = open_backend(backend, engines=Path(engines), device=device, cuda_graphs=cuda_graphs)
        return cls(opened, opened.size)

    def infer(self, stage: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        return self.backend.runner(stage).infer(feeds)

    # -- once per photo -------------------------------------------------------------------------
    def prepare_avatar(self, image: ImageLike, preprocess: str = "crop", name: Optional[str] = None) -> Avatar:
        """``name`` says which file an array came from, for messages."""
        from .. import media
        from . import landmarks
        from . import preprocess as prep

        if preprocess not in PREPROCESS_MODES:
            raise UsageError(f"--preprocess must be one of {', '.join(PREPROCESS_MODES)}, not '{preprocess}'.")
        name = name or (str(image) if not isinstance(image, np.ndarray) else "the image")
        photo = media.load_image(image) if not isinstance(image, np.ndarray) else np.ascontiguousarray(image)
        found = landmarks.detect(photo, name=name)
        notes = list(found.notes)
        frame, crop_info = prep.crop_source(photo, None if preprocess == "resize" else found.landmarks, preprocess,
                                            self.size)
        # The official code finds landmarks again on the S x S crop for the 3DMM alignment. Where the crop
        # squashed the face beyond recognition (resize mode on a tall photo), map the first pass into the frame.
        try:
            frame_landmarks = landmarks.detect(frame, name=f"the {preprocess} crop of {name}").landmarks
        except InputError:
            frame_landmarks = prep.points_in_frame(found.landmarks, crop_info, self.size)
            notes.append("no face found again in the cropped frame; using the photo's landmarks mapped into it")
        trans_params, aligned = prep.align_for_3dmm(frame, frame_landmarks)
        coeffs257 = self.infer("face3d_recon", aligned_image=_chw(aligned))["coeffs"]
        source_coeffs = prep.first_frame_coeffs(coeffs257, trans_params)
        from .face_restore import points_from_landmarks68

        avatar = Avatar(self.size, preprocess, frame, source_coeffs, crop_info,
                        photo if is_full(preprocess) else None, notes=notes,
                        face_points=points_from_landmarks68(frame_landmarks), face_landmarks=frame_landmarks)
        self._source_features(avatar)
        return avatar

    def _source_features(self, avatar: Avatar) -> None:
        from .coeffs import semantic_windows

        source_image = _chw(avatar.source_frame)
        kp_canonical = self.infer("kp_detector", source_image=source_image)["kp_canonical"]
        encoded = self.infer("source_encoder", source_image=source_image)
        full = is_full(avatar.preprocess)
        source_semantics, _ = semantic_windows(avatar.source_coeffs[:, :COEFFS], avatar.source_coeffs, full=full,
                                               still=False, expression_scale=1.0)
        kp_source = self.infer(mapping_stage(avatar.preprocess), kp_canonical=kp_canonical,
                               semantics=source_semantics.astype(np.float32))["kp"]
        avatar.features = {"kp_canonical": kp_canonical, "kp_source": kp_source, **encoded}

    # -- once per utterance ---------------------------------------------------------------------
    def motion(self, avatar: Avatar, audio: AudioLike, options: Options = Options(),
               progress: Progress = _noop, name: Optional[str] = None,
               on_note: Callable[[str], None] = lambda line: None) -> Motion:
        """``on_note`` hears each line worth telling the user (frames of a reference video without a face)."""
        from .. import media
        from .streaming import MotionStream

        options.validate()
        wav = media.load_audio(audio, SAMPLE_RATE) if not isinstance(audio, np.ndarray) else audio.astype(np.float32)
        if options.duration is not None:
            wav = wav[: int(round(options.duration * SAMPLE_RATE))]
        name = name or (str(audio) if not isinstance(audio, np.ndarray) else "the audio")
        frames = len(wav) // SAMPLES_PER_FRAME
        notes: list[str] = []
        references = self._references(avatar, options, frames, progress, notes, on_note) if frames >= 1 else {}
        # The streaming computation fed everything at once: one implementation of the motion for both paths.
        stream = MotionStream(self.infer, avatar, options, progress, name=name, references=references)
        stream.feed(wav, last=True)
        motion = stream.result()
        motion.notes = notes
        return motion

    def _references(self, avatar: Avatar, options: Options, frames: int, progress: Progress, notes: list,
                    on_note: Callable[[str], None]) -> dict[str, np.ndarray]:
        """The (N, 73) coefficients of each reference video, of its first ``frames`` frames; a file given
        for both options is read once."""
        found: dict[str, np.ndarray] = {}
        by_file: dict[str, np.ndarray] = {}
        for option in ("ref_eyeblink", "ref_pose"):
            reference = getattr(options, option)
            if reference is None or isinstance(reference, np.ndarray):
                if reference is not None:
                    found[option] = reference
                continue
            key = str(Path(reference).resolve())
            if key not in by_file:
                result = self.reference(reference, avatar.preprocess, max_frames=frames, progress=progress)
                for line in result.notes:
                    notes.append(line)
                    on_note(line)
                by_file[key] = result.coeffs
            found[option] = by_file[key]
        return found

    def reference(self, video: Union[str, Path], preprocess: str = "crop", max_frames: Optional[int] = None,
                  progress: Progress = _noop):
        """A reference video's per-frame coefficients (``reference_video.ReferenceCoeffs``), prepared like the
        source photo through this backend's face3d_recon stage; ``max_frames`` limits the frames decoded."""
        from ..media.video_input import iter_video_frames
        from .reference_video import reference_coeffs

        def frames():
            for index, frame in enumerate(iter_video_frames(video, max_frames)):
                yield frame
                progress("reference video", index + 1, max_frames or index + 1)

        def regress(aligned: np.ndarray) -> np.ndarray:
            return self.infer("face3d_recon", aligned_image=aligned)["coeffs"]

        return reference_coeffs(frames(), preprocess, self.size, regress, str(video))

    # -- per frame ------------------------------------------------------------------------------
    def render(self, avatar: Avatar, motion: Motion, options: Options = Options(),
               progress: Progress = _noop) -> Iterator[Frame]:
        from .coeffs import target_windows
        from .compose import Compositor
        from .scheduler import FramePipeline, one_batch_ahead

        targets = target_windows(motion.coeffs.astype(np.float32), avatar.source_coeffs, full=is_full(avatar.preprocess),
                                 still=options.still, expression_scale=options.expression_scale)
        compositor = Compositor(avatar)
        enhance = self.frame_enhancer(avatar, compositor, options)
        view = options.free_view()
        features, per_frame = avatar.features, None
        if view.active:         # given head angles: the free-view mapping stage takes them per frame
            angles, angle_given = view.angles(motion.frames)
            features, per_frame = {**avatar.features, "angle_given": angle_given}, {"angles": angles}
        executor = self.backend.executor()
        pipeline = FramePipeline(executor, features, self.size, options.batch_size,
                                 mapping=mapping_stage(avatar.preprocess, free_view=view.active))
        batches = self._rendered_batches(pipeline.frames(targets, per_frame), compositor, options.batch_size,
                                         motion.frames, progress)
        if enhance is None:
            for batch in batches:
                yield from batch
            return

        def enhanced(batch: list[Frame]) -> list[Frame]:
            indices = [f.index for f in batch]
            images = enhance([f.image for f in batch], indices)
            return [Frame(i, i / FPS, image) for i, image in zip(indices, images)]

        # Batch k is enhanced while batch k + 1 renders: on a GPU backend the renderer's launches of k + 1 are
        # already on its streams when the frames of k arrive here; on host backends a worker thread enhances.
        ahead = self.enhance_ahead if self.enhance_ahead is not None else executor.enhance_in_worker
        results = one_batch_ahead(batches, enhanced) if ahead else map(enhanced, batches)
        for batch in results:
            yield from batch

    @staticmethod
    def _rendered_batches(frames, compositor, batch_size: int, total: int, progress: Progress
                          ) -> Iterator[list[Frame]]:
        """The composited frames of each renderer batch, as soon as the batch's last frame is converted."""
        batch: list[Frame] = []
        for index, chw in frames:
            # chw is a view into a reused host buffer: convert it before the next frame.
            batch.append(Frame(index, index / FPS, compositor(to_uint8(chw))))
            if len(batch) == batch_size or index + 1 == total:
                progress("render", index + 1, total)
                yield batch
                batch = []

    def frame_enhancer(self, avatar: Avatar, compositor, options: Options
                       ) -> Optional[Callable[[list, list], list]]:
        """``enhance(images, indices)`` for one video (its own alignment: frames in order, in batches of
        ``options.batch_size``), or None without ``options.enhancer``."""
        if options.enhancer is None:
            return None
        if self.enhancer is None:
            raise UsageError("--enhancer gfpgan needs the enhancer's weights (GFPGANv1.4.pth) or --synthetic-weights; "
                             "this TalkingHead was made without them.")
        if options.enhancer_points == "track" and avatar.face_landmarks is not None:
            alignment = self.enhancer.tracking(compositor.map_points(avatar.face_landmarks))
        else:
            alignment = self.enhancer.fixed(compositor.map_points(avatar.face_points))

        def enhance(images: list, indices: list) -> list:
            return self.enhancer(images, indices, options.enhancer_noise, options.seed, alignment=alignment)
        return enhance

    def generate(self, avatar: Avatar, audio: AudioLike, options: Options = Options(),
                 progress: Progress = _noop) -> Iterator[Frame]:
        yield from self.render(avatar, self.motion(avatar, audio, options, progress), options, progress)

    def stream(self, avatar: Avatar, chunks, options: Options = Options(), turn=None):
        """Frames as soon as they are final from 16 kHz mono PCM chunks of any sizes (bytes of int16, int16 or
        float arrays), an iterator or an async iterator (which gives an async iterator of frames). The frames
        equal ``generate``'s on the same audio, with any ``options`` (what each holds back: ``streaming``). ``turn``: a context manager factory held around each model call
        (sessions sharing one model take turns)."""
        from .streaming import stream

        return stream(self, avatar, chunks, options, turn)

    def write_video(self, avatar: Avatar, audio: AudioLike, output: Union[str, Path], options: Options = Options(),
                    overwrite: bool = False, progress: Progress = _noop, audio_name: Optional[str] = None,
                    on_note: Callable[[str], None] = lambda line: None) -> Path:
        from ..media import VideoWriter

        motion = self.motion(avatar, audio, options, progress, name=audio_name, on_note=on_note)
        width, height = avatar.output_size
        if options.enhancer is not None:
            width, height = width * self.enhancer.upscale, height * self.enhancer.upscale
        with VideoWriter(Path(output), width, height, audio=motion.wav, fps=FPS, sample_rate=SAMPLE_RATE,
                         overwrite=overwrite) as writer:
            for frame in self.render(avatar, motion, options, progress):
                writer.write(frame.image)
        return Path(output)


def _chw(image_hwc: np.ndarray) -> np.ndarray:
    """uint8 HWC RGB -> float32 (1, 3, H, W) in [0, 1], as the official skimage conversion gives."""
    return (image_hwc.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()
