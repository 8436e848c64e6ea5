"""Shared fixtures. ../shared (conformance cases, example photos and speech) sits beside the checkout;
tests that need it skip with a reason where it is absent. SADTALKER_RT_SHARED overrides the location."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SADTALKER_RT_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared conformance and example inputs live beside the checkout)")
    return path


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    return shared_path("conformance")


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    return shared_path("assets")
