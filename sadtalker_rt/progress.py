"""Progress bars for long work: one bar per stage, on stderr, quiet when not a terminal unless asked."""
from __future__ import annotations

import sys


class StageBars:
    """A ``Progress`` callback (stage, done, total) that keeps one tqdm bar per stage."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bars: dict = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total, desc=f"{stage:<10}", unit="frame" if stage == "render" else "step",
                                           file=sys.stderr, leave=True, dynamic_ncols=True)
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
