"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope="session")
def native_extension():
    """The compiled native extension (nanomoe/csrc); the test is skipped where it cannot be built."""
    from nanomoe import native

    extension = native.load_extension()
    if extension is None:
        pytest.skip(f"the native kernels did not build: {native._build_error}")
    return extension
