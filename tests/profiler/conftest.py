"""Fixtures of the profiler tests: the fake SGLang server of tests/support/fake_sglang.py and the tiny
Hugging Face models of tests/support/hf_tiny_models.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from fake_sglang import FakeSGLang, sglang_app
from hf_tiny_models import save_tiny_model
from http_fixture import serving


@pytest.fixture(scope="module")
def sglang_server():
    """The fake SGLang server's state and its URL, one server per test module."""
    state = FakeSGLang()
    with serving(sglang_app(state)) as url:
        yield state, url


@pytest.fixture
def sglang(sglang_server, tmp_path):
    """The server, reset to write its dumps into this test's own folder."""
    state, url = sglang_server
    state.configure(tmp_path)
    return state, url


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """get(family) -> the folder of that family's tiny model, saved once per test module."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = save_tiny_model(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get
