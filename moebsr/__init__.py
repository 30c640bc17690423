"""moebsr: multitask fine-tuning of a mixture-of-experts ViT under a small device's memory and compute.

The supported API, imported on first use (PEP 562) so that ``import moebsr`` and a light command such as
``moebsr tasks`` do not pay for torch, timm and accelerate:

- configure: :func:`load_config`, :class:`RunConfig`
- create the model: :func:`create_moevit` (from a timm name), :func:`model_from_config` (from a run's config)
- train: :func:`train`; evaluate: :func:`evaluate_run`
- export and load: :func:`export_task` (one task, pruned/ONNX), :func:`load_exported_model`
- predict: :func:`predict`; profile: :func:`profile_config`; plan to a budget: :func:`run_plan`
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0.dev0"

# name -> the module that defines it
_EXPORTS = {
    "RunConfig": "moebsr.config", "load_config": "moebsr.config",
    "create_moevit": "moebsr.model.factory",
    "model_from_config": "moebsr.training.build",
    "train": "moebsr.training.loop",
    "evaluate_run": "moebsr.training.evaluate",
    "load_exported_model": "moebsr.training.export",
    "export_task": "moebsr.deploy.exporter",
    "predict": "moebsr.deploy.predict",
    "profile_config": "moebsr.analysis.profiling",
    "run_plan": "moebsr.planning.plan",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
