"""Shared fixtures: a fresh plugin host per test, no network, quiet AutoAttack checks."""

from __future__ import annotations

import socket
import sys

import pytest
import torch

from robustbench_kd.plugin_host import PluginHost


@pytest.fixture
def host() -> PluginHost:
    """A fresh plugin host with the built-ins only (no entry-point plugins from the environment)."""
    return PluginHost.create(autoload=False)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download attempt fails the test instead of reaching (or waiting for) the network.

    Stricter than the autouse socket guard: robustbench's Google Drive downloader (gdown) is refused too,
    before it opens a connection.
    """
    import gdown

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(gdown, "download", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(autouse=True)
def _keep_tracing(monkeypatch):
    """AutoAttack's check_dynamic calls sys.settrace(None), which would switch off coverage."""
    try:
        import pyautoattack.checks as checks
    except ImportError:  # pragma: no cover - pyautoattack is a dependency
        return
    monkeypatch.setattr(checks, "check_dynamic", lambda *a, **k: None)
    original = sys.modules.get("autoattack.checks")  # fra31's package, where it is installed
    if original is not None and original is not checks:
        monkeypatch.setattr(original, "check_dynamic", lambda *a, **k: None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_for_attacks(request):
    """Modules marked ``pytestmark = pytest.mark.single_thread`` run torch on one thread.

    Tiny models are dominated by thread synchronisation: on a busy 2-core box AutoAttack runs ~30x faster
    single-threaded.
    """
    if request.node.get_closest_marker("single_thread") is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
