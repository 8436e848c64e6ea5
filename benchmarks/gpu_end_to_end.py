"""End to end on a CUDA GPU: audio -> coefficients -> frames -> H.264/AAC mp4, per torch precision.

    python benchmarks/gpu_end_to_end.py AVATAR.pkl AUDIO.npy --json out.json

The avatar (photo geometry and first-frame coefficients) is prepared beforehand on any machine
(`prepare` below), so this measures what repeats per utterance: motion, rendering, paste-back and
encoding. Source features are computed on the GPU once, before the clock starts.
"""
from __future__ import annotations

import argparse
import json
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np


def prepare(image: str, audio: str, out_dir: Path, preprocess: str = "crop") -> None:
    from sadtalker_rt import media
    from sadtalker_rt.models.checkpoints import WeightSource
    from sadtalker_rt.runtime.pipeline import TalkingHead

    head = TalkingHead.from_weights(WeightSource(synthetic_seed=0))
    avatar = head.prepare_avatar(image, preprocess)
    avatar.features = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"avatar_{preprocess}.pkl").write_bytes(pickle.dumps(avatar))
    np.save(out_dir / "audio.npy", media.load_audio(audio))


def main() -> None:
    import torch

    from sadtalker_rt.models.checkpoints import WeightSource
    from sadtalker_rt.runtime.pipeline import Options, TalkingHead

    parser = argparse.ArgumentParser()
    parser.add_argument("avatar", type=Path)
    parser.add_argument("audio", type=Path)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    wav = np.load(args.audio)
    seconds = len(wav) / 16000
    rows = []
    for precision, graphs in (("fp32", False), ("fp16", False), ("fp16", True)):
        head = TalkingHead.from_weights(WeightSource(synthetic_seed=0), device="cuda", precision=precision,
                                        cuda_graphs=graphs)
        avatar = pickle.loads(args.avatar.read_bytes())
        head._source_features(avatar)
        options = Options(batch_size=args.batch_size)
        list(head.generate(avatar, wav[:16000], options))      # warm-up: cuDNN autotuning, allocations
        torch.cuda.synchronize()
        start = time.perf_counter()
        frames = head.generate(avatar, wav, options)
        first = next(frames)
        first_s = time.perf_counter() - start
        count = 1 + sum(1 for _ in frames)
        generate_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            head.write_video(avatar, wav, Path(tmp) / "out.mp4", options)
            video_s = time.perf_counter() - start
        row = {"precision": precision, "cuda_graphs": graphs, "batch": args.batch_size, "audio_seconds": seconds, "frames": count,
               "time_to_first_frame_s": first_s, "generate_s": generate_s, "write_video_s": video_s,
               "wall_per_audio_second": video_s / seconds, "realtime_factor": seconds / video_s,
               "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "preprocess": avatar.preprocess}
        rows.append(row)
        print(json.dumps(row))
        del head
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
