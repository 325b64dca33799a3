"""pytest settings for the examples of the documentation pages (run as doctests)."""

import pytest


@pytest.fixture(autouse=True)
def _in_temporary_directory(tmp_path, monkeypatch):
    """Run each page in an empty folder, so that files its examples write (a saved model,
    a catalog) land there and not in the folder the tests run from."""
    monkeypatch.chdir(tmp_path)
