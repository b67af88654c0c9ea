"""Fixtures for the search tests; the made-up estimator lives in `made_up_estimator`."""

import pytest

from made_up_estimator import made_up_estimate


@pytest.fixture
def made_up(monkeypatch):
    """Patch the static bound away (it reads the real inventories) and clear the cache; returns
    the estimator and the list of specs it was asked about."""
    import vramplan.fit.walk as search

    search.clear_cache()
    monkeypatch.setattr(search, "static_bytes", lambda spec, inventories: 0)
    seen = []

    def estimator(spec):
        seen.append(spec)
        return made_up_estimate(spec)

    yield estimator, seen
    search.clear_cache()


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_pipeline):
    """(model folder, images folder) of the shared tiny pipeline."""
    return tiny_pipeline / "model", tiny_pipeline / "images"