"""The inputs of the commands, read and checked before any model loads: the photo and speech of a run, the photo
export validates on, and the face enhancer's weights."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .errors import OutputError, UsageError, WeightsError


def load_run_inputs(image: Path, audio: Path, output: Path, overwrite: bool, references: tuple = ()):
    """Decode both inputs (and the first frame of each reference video) and check the output location;
    returns (photo, wav)."""
    from . import media
    from .media.video_input import first_video_frame

    photo, wav = media.load_image(image), media.load_audio(audio)
    references = [r for r in references if r is not None]
    for reference in references:
        first_video_frame(reference)
    for source in (image, audio, *references):
        if output.exists() and output.resolve() == source.resolve():
            raise OutputError(f"{output} is an input of this run; choose another output.")
    media.check_output_path(output, overwrite)
    return photo, wav


def source_image(image: Optional[Path], size: int):
    """A real photo (default: the demo photo), centre-cropped and resized to S x S, as (1, 3, S, S) in [0, 1]."""
    import numpy as np
    from PIL import Image

    from . import media

    photo = media.load_image(image if image is not None else media.demo_image())
    h, w = photo.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
    return (np.asarray(square, np.float32) / 255.0).transpose(2, 0, 1)[None].copy()


def find_enhancer_weights(enhancer: Optional[str], location: Optional[Path], checkpoints: Optional[Path],
                     synthetic_weights: Optional[int]):
    """The enhancer's weights for ``--enhancer gfpgan`` (None without it): synthetic, or GFPGANv1.4.pth in
    ``location`` or beside the checkpoints."""
    if enhancer is None:
        if location is not None:
            raise UsageError("--enhancer-weights is for --enhancer gfpgan.")
        return None
    from .models.enhancer_weights import EnhancerWeights

    if synthetic_weights is not None and location is None:
        return EnhancerWeights(synthetic_seed=synthetic_weights)
    where = location or checkpoints
    if where is None or not where.exists():
        raise WeightsError(f"--enhancer gfpgan needs GFPGANv1.4.pth: {where} does not exist." if where else
                           "--enhancer gfpgan needs GFPGANv1.4.pth: give --enhancer-weights or --checkpoints.")
    weights = EnhancerWeights(where)
    if not weights.has("parsenet"):
        typer.echo("note: parsing_parsenet.pth not found; the face is pasted back through a feathered square mask.",
                   err=True)
    return weights
