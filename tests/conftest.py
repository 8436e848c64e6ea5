"""Shared fixtures. ../shared (conformance cases, example photos and speech) sits beside the checkout;
tests that need it skip with a reason where it is absent, except in CI (CI=true), where those tests are
the point and a missing ../shared stops the run. SADTALKER_RT_SHARED overrides the location."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SADTALKER_RT_SHARED", REPO.parent / "shared"))


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("CI", "").lower() == "true" and not SHARED.is_dir():
        raise pytest.UsageError(f"CI=true but {SHARED} is absent: the conformance, pipeline and robustness tests "
                                "need it (set SADTALKER_RT_SHARED to its location).")


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


@pytest.fixture(scope="session")
def enhancer_cases() -> Path:
    return shared_path("conformance-enhancer")
