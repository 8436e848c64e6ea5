"""What one server allows, and the helpers that enforce it without letting one client harm another."""
from __future__ import annotations

import ipaddress
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class ServeConfig:
    token: Optional[str] = None             # bearer token; required when listening beyond loopback
    max_upload_bytes: int = 20 * 2**20      # one photo or audio upload, or one whole HTTP request
    max_audio_seconds: float = 120.0        # per websocket session or HTTP job
    max_sessions: int = 4                   # websocket sessions and HTTP jobs at once; more are refused
    max_avatars: int = 16                   # prepared photos kept (least recently used dropped)
    max_message_bytes: int = 2**20          # one websocket message (PCM chunk)
    frame_queue: int = 8                    # encoded frames waiting for a slow client, per session
    audio_queue: int = 8                    # PCM chunks waiting for the renderer, per session
    batch_size: int = 1                     # frames per renderer call (1: the lowest latency)
    jpeg_quality: int = 85


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FairTurns:
    """A first-come first-served lock: sessions sharing one model take turns per model call."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: deque[threading.Event] = deque()
        self._busy = False

    @contextmanager
    def __call__(self):
        with self._lock:
            if not self._busy:
                self._busy = True
                ticket = None
            else:
                ticket = threading.Event()
                self._waiting.append(ticket)
        if ticket is not None:
            ticket.wait()
        try:
            yield
        finally:
            with self._lock:
                if self._waiting:
                    self._waiting.popleft().set()       # hand the turn over directly: no barging
                else:
                    self._busy = False


class Slots:
    """At most ``limit`` holders; ``try_take`` never waits (a session beyond the limit is refused)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def try_take(self) -> bool:
        with self._lock:
            if self.used >= self.limit:
                return False
            self.used += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.used -= 1


class TurnTakingBackend:
    """A backend whose runners take turns (``FairTurns``) around every call; the frame scheduler calls its
    stages in order (sessions interleave between calls)."""

    def __init__(self, backend, turns: FairTurns):
        self.inner, self.turns, self.size = backend, turns, getattr(backend, "size", None)
        self.name, self.precision = f"{getattr(backend, 'name', 'backend')} (shared)", getattr(backend, "precision", None)
        self.notes = list(getattr(backend, "notes", []))
        self._runners = {}

    def executor(self):
        from ..runtime.scheduler import SerialExecutor

        return SerialExecutor(self.runner)

    def runner(self, stage: str):
        if stage not in self._runners:
            self._runners[stage] = _TurnTakingRunner(self.inner.runner(stage), self.turns)
        return self._runners[stage]


class _TurnTakingRunner:
    def __init__(self, runner, turns: FairTurns):
        self.runner, self.turns = runner, turns

    def infer(self, feeds: dict) -> dict:
        with self.turns():
            # copied inside the turn: a backend may hand out buffers that its next call rewrites
            return {name: np.array(value, copy=True) for name, value in self.runner.infer(feeds).items()}
