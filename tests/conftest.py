"""Shared test set-up: the real data samples in ../shared/data (relative to the repository root),
and the serving tests' fixtures.

The samples are never copied into the repository. A test that reads one asks for it through
`shared_data` (a fixture) or `shared_data_path` (for cached helpers outside a test, such as
tests/serving_helpers.py); either skips the test, naming the missing path, when it is absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data_path(*parts: str) -> Path:
    """The path `parts` under ../shared/data, or skip the calling test saying what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data sample not found: {path} (these tests read ../shared/data; see its README)")
    return path


@pytest.fixture
def shared_data() -> Callable[..., Path]:
    """`shared_data("criteo-8k", "train.txt")`: a real sample's path, or the test is skipped."""
    return shared_data_path


# The serving tests' shared fixtures (tests/serving/): the criteo-8k model of tests/serving_helpers.py,
# trained once per session, as a verified bundle, and one of its raw rows as request features.
@pytest.fixture(scope="module")
def bundle():
    from masknet.serving.bundle import verify_and_load
    from serving_helpers import trained

    return verify_and_load(trained("criteo8k"))


@pytest.fixture(scope="module")
def row():
    from serving_helpers import criteo_rows

    return criteo_rows(1)[0]
