"""Shared fixtures: tiny random models for unit tests, the real demo model for integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpissa.models import make_tiny_model


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--integration", action="store_true", help="also run tests on the real demo model")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--integration"):
        return
    skip = pytest.mark.skip(reason="uses the demo model; run with --integration")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide random Llama checkpoint (bf16 safetensors, tied embeddings)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a HF checkpoint, fetched once per session (or from QPISSA_DEMO_MODEL)."""
    import os

    from qpissa.models import fetch_demo_model

    cached = os.environ.get("QPISSA_DEMO_MODEL")
    target = Path(cached) if cached else tmp_path_factory.mktemp("demo") / "smollm2-135m"
    return fetch_demo_model("smollm2-135m", target)
