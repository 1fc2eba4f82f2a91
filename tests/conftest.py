"""Shared fixtures: a fresh plugin host per test, no network, quiet AutoAttack checks."""

from __future__ import annotations

import socket

import pytest

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


@pytest.fixture(autouse=True)
def _keep_tracing(monkeypatch):
    """AutoAttack's check_dynamic calls sys.settrace(None), which would switch off coverage."""
    try:
        import pyautoattack.checks as checks
    except ImportError:  # pragma: no cover - pyautoattack is a dependency
        return
    monkeypatch.setattr(checks, "check_dynamic", lambda *a, **k: None)
