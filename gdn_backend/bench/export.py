"""An engine's kernel modules, copied out of its installed package into a folder that imports
as that package, beside stand-ins for the few helpers they import: how an engine's own
kernels reach a machine where the engine does not install (the GPU machine)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from importlib.metadata import version as dist_version


def export(package: str, kernel_files, helpers: dict, dest: str) -> str:
    """Write `package`'s `kernel_files` (paths inside it) and `helpers` ({path: text}) under
    dest/package, with a VERSION stamp; returns that folder."""
    src = os.path.dirname(importlib.util.find_spec(package).origin)
    root = os.path.join(dest, package)
    shutil.rmtree(root, ignore_errors=True)
    for rel in kernel_files:
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        shutil.copy(os.path.join(src, rel), os.path.join(root, rel))
    for rel, text in helpers.items():
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel), "w") as f:
            f.write(text)
    for folder, _, files in os.walk(root):
        if "__init__.py" not in files:
            open(os.path.join(folder, "__init__.py"), "w").close()
    with open(os.path.join(root, "VERSION"), "w") as f:
        f.write(dist_version(package) + "\n")
    return root


def version(package: str) -> str:
    """The exported (or installed) package's version, without importing it."""
    stamp = os.path.join(os.path.dirname(importlib.util.find_spec(package).origin), "VERSION")
    if os.path.exists(stamp):
        with open(stamp) as f:
            return f.read().strip()
    return dist_version(package)
