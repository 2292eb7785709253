"""Shared fixtures: a private cache, quick settings and one trained quick run."""

import os

import pytest

os.environ.setdefault("AUTORESEARCH_QUICK", "1")  # every test sizes itself for a CPU in seconds


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A cache folder for tokenizers and token files, shared by the whole test session."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["AUTORESEARCH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def quick_settings(cache):
    from autoresearch_lib.config import make_settings

    return make_settings("quick", cache_dir=str(cache))


@pytest.fixture(scope="session")
def prepared(quick_settings):
    from autoresearch_lib import data

    return data.prepare(quick_settings, verbose=False)


@pytest.fixture(scope="session")
def trained(cache, tmp_path_factory):
    """One real quick training run (a few seconds), reused by the tests that read its result."""
    import autoresearch_lib as ar

    run_dir = tmp_path_factory.mktemp("run")
    return ar.train(preset="quick", budget=4, run_dir=run_dir, cache_dir=str(cache))


@pytest.fixture
def llm():
    """A scripted OpenAI-compatible server (agents.fake_server) for one test, shut down after it."""
    from autoresearch_lib.agents.fake_server import FakeChatServer

    server = FakeChatServer()
    yield server
    server.close()
