"""Shared fixtures for the oracle tests: the dmsrt binary, the default model, llama.cpp.

llama.cpp (the PyPI package llama-cpp-python) is an independent implementation used only here
and in benchmarks; the runtime never depends on it. Tests skip with a reason when the model or the
package is missing, so a partial machine reports what it could not check.
"""
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def dmsrt_bin():
    path = os.environ.get("DMSRT_BIN", os.path.join(ROOT, "build", "bin", "dmsrt"))
    if not os.path.exists(path):
        pytest.skip(f"dmsrt binary not built at {path}")
    return path


@pytest.fixture(scope="session")
def model_path():
    path = os.environ.get("DMSRT_MODEL", os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not os.path.exists(path):
        pytest.skip(f"default model missing at {path}: run launch/setup.sh")
    return path


@pytest.fixture(scope="session")
def llama_cpp_mod():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        pytest.skip("llama-cpp-python is not installed: run launch/setup.sh --test-deps")
    return llama_cpp


def run_json(cmd, **kw):
    """Runs a dmsrt command that prints one JSON object; fails the test with stderr otherwise."""
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])
