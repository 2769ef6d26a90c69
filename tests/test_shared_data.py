"""tests/conftest.py's shared-data helper: a missing sample skips the test and names the path."""

from __future__ import annotations

import pytest

from conftest import SHARED_DATA, shared_data_path


def test_a_missing_sample_skips_naming_its_path():
    with pytest.raises(pytest.skip.Exception, match=r"real data sample not found: .*no-such-sample.*\.\./shared/data"):
        shared_data_path("no-such-sample", "x.txt")


def test_a_present_sample_is_returned(shared_data):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    assert shared_data() == SHARED_DATA
