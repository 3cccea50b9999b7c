"""Both import paths, and living next to lymph 0.15 without shadowing or breaking it."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import lymph_chaos
from lymph_chaos.rpc import RpcNode, zmq_module

if TYPE_CHECKING:  # pytest loads conftest.py itself; this import is for the type checker only
    from conftest import Env

EXPECT_LYMPH = os.environ.get("CHAOS_PY_EXPECT_LYMPH")


def lymph_installed() -> bool:
    return importlib.util.find_spec("lymph.monkey") is not None


def test_both_import_paths_give_the_same_scenario() -> None:
    import lymph.chaos
    from lymph.chaos import Scenario as OldPath

    assert OldPath is lymph_chaos.Scenario
    assert lymph.chaos.UnknownService is lymph_chaos.UnknownService
    assert lymph.chaos.__version__ == lymph_chaos.__version__


def test_the_distribution_ships_no_lymph_init() -> None:
    from importlib.metadata import files

    shipped = {str(f) for f in files("lymph-chaos") or []}
    assert "lymph/chaos/__init__.py" in shipped and "lymph_chaos/scenario.py" in shipped, shipped
    assert "lymph/__init__.py" not in shipped


def test_the_version_is_the_workspace_version() -> None:
    """One release number: the distribution's version (from ``lymph_chaos.__version__``) is the agent's, the
    ``[workspace.package]`` version of the top-level Cargo.toml."""
    from importlib.metadata import version

    cargo = (Path(__file__).resolve().parents[3] / "Cargo.toml").read_text(encoding="utf-8")
    section = re.search(r"^\[workspace\.package\]\n(.*?)(?:^\[|\Z)", cargo, re.M | re.S)
    assert section, "no [workspace.package] in Cargo.toml"
    workspace = re.search(r'^version\s*=\s*"([^"]+)"', section.group(1), re.M)
    assert workspace, "no version in [workspace.package]"
    assert lymph_chaos.__version__ == workspace.group(1), (lymph_chaos.__version__, workspace.group(1))
    assert version("lymph-chaos") == workspace.group(1)


def test_the_client_neither_requires_nor_imports_msgpack() -> None:
    """Next to lymph 0.15 the ``msgpack`` module is lymph's 0.5: the client declares no msgpack (so pip never
    replaces it) and never imports one (its own codec speaks the wire format)."""
    from importlib.metadata import requires

    assert not [r for r in requires("lymph-chaos") or [] if re.match(r"msgpack", r, re.I)], requires("lymph-chaos")
    script = (
        "import sys, lymph_chaos, lymph_chaos.experiment, lymph_chaos.pytest_plugin, lymph.chaos\n"
        "assert 'msgpack' not in sys.modules, sys.modules['msgpack']\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_zmq_flavour_follows_gevent_patching() -> None:
    import zmq

    patched = "gevent.monkey" in sys.modules and sys.modules["gevent.monkey"].is_module_patched("threading")
    assert patched == (os.environ.get("CHAOS_PY_GEVENT") == "1")
    with RpcNode() as node:
        green = type(node._ctx).__module__.startswith("zmq.green")
    assert green == patched
    assert (zmq_module() is not zmq) == patched


@pytest.mark.skipif(EXPECT_LYMPH == "0", reason="this run is for a venv without lymph")
def test_lymph_still_works_next_to_the_client(env: Env) -> None:
    """lymph 0.15 (a namespace package without lymph/__init__.py) keeps working with lymph.chaos installed."""
    if EXPECT_LYMPH == "1":
        assert lymph_installed(), "lymph 0.15 should be installed in this venv"
    elif not lymph_installed():
        pytest.skip("lymph is not installed here")
    # A fresh interpreter: lymph's own start-up (monkey patching, exports), then both packages side by side.
    script = """
import lymph.monkey
lymph.monkey.patch()
import lymph, msgpack
assert lymph.Interface.__module__ == 'lymph.core.interfaces', lymph.Interface
import lymph.core.rpc, lymph.discovery.zookeeper, lymph.serializers
from lymph.chaos import Scenario
import lymph_chaos
assert Scenario is lymph_chaos.Scenario
# lymph 0.15 needs msgpack < 1.0 (it passes encoding=): installing the client must not have replaced it.
assert msgpack.version < (1, 0, 0), msgpack.version
print('ok', msgpack.version, sorted(lymph.__path__))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr

    # The real lymph CLI, end to end (ZooKeeper lookup, msgpack request and reply) against the test's Echo.
    lymph_cli = Path(sys.executable).parent / "lymph"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "lymph.yml"
        config.write_text(
            "container:\n"
            "    ip: 127.0.0.1\n"
            "    registry:\n"
            "        class: lymph.discovery.zookeeper:ZookeeperServiceRegistry\n"
            "        zkclient:\n"
            "            class: kazoo.client:KazooClient\n"
            f'            hosts: "{env.zk_hosts}"\n'
            "    events:\n"
            "        class: lymph.events.null:NullEventSystem\n"
        )
        deadline = time.monotonic() + 30  # Echo may be restarting after an earlier test's kill
        while True:
            out = subprocess.run(
                [str(lymph_cli), "request", f"--config={config}", f"{env.service}.upper", '{"text": "hi"}'],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if (out.returncode == 0 and out.stdout.strip() == "'HI'") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert out.returncode == 0 and out.stdout.strip() == "'HI'", out.stdout + out.stderr


@pytest.mark.skipif(EXPECT_LYMPH != "0", reason="only for a venv without lymph")
def test_without_lymph_the_namespace_holds_only_the_client() -> None:
    import lymph

    assert not lymph_installed()
    assert not hasattr(lymph, "__file__") or lymph.__file__ is None  # an implicit namespace package
    assert [p.name for p in Path(next(iter(lymph.__path__))).iterdir() if not p.name.startswith("__")] == ["chaos"]
    # A plain `pip install` of the client pulled in no msgpack: the client works without one.
    assert importlib.util.find_spec("msgpack") is None, "the standalone venv should have no msgpack"
