"""Make the PyPI torchvision (a CUDA build) importable next to a CPU-only torch.

Installed into site-packages by ``scripts/setup.sh`` together with a ``.pth`` file, so it runs at every
interpreter start (pytest, ``accelerate launch`` workers, subprocesses). It costs nothing until something
imports torchvision: a one-shot import hook then checks whether torchvision's compiled ``_C`` loads with
this torch, and only when it does not, defines the two operator schemas (``nms``, ``qnms``) whose fake
registrations torchvision installs unguarded at import. timm, torchvision transforms and accelerate then
work; ``torchvision.ops.nms`` and ``torchvision.io`` stay unavailable (moebsr decodes images with PIL).
It is part of the CPU install step on purpose, not of the moebsr package.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_LIBRARY = None  # a torch.library.Library must stay referenced or its definitions are dropped


def _define_missing_torchvision_ops() -> None:
    global _LIBRARY
    import torch

    if torch.version.cuda is not None:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    package_dir = os.path.dirname(spec.origin)
    extensions = [name for name in os.listdir(package_dir) if name.startswith("_C.") and name.endswith(".so")]
    if not extensions:
        return
    try:
        torch.ops.load_library(os.path.join(package_dir, extensions[0]))
        return  # a matching build: nothing to fix
    except (OSError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY = library


class _TorchvisionImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: D401 - import protocol
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        try:
            _define_missing_torchvision_ops()
        except Exception as error:  # never break an interpreter start over this
            print(f"moebsr cpu torchvision fix skipped: {error}", file=sys.stderr)
        return None  # let the normal finders import torchvision


if not any(isinstance(finder, _TorchvisionImportHook) for finder in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionImportHook())
