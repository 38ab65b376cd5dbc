"""Fixtures of the profiler tests: the fake SGLang server of tests/support/fake_sglang.py."""

from __future__ import annotations

import pytest

from fake_sglang import FakeSGLang, sglang_app
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
