"""Helpers for tests against the engines' real code."""

import importlib
import os

import pytest


def require(module: str):
    """Import an engine module; skip without it, except in CI, where its absence is a failure."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{module} is not installed ({e})", allow_module_level=True)
