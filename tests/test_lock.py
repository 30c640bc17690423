"""The lock (constraints.txt): it covers everything moebsr[dev] pulls in, and the suite runs on what it says."""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# scripts/update_lock.sh points this at the candidate lock it is about to write
LOCK = Path(os.environ.get("MOEBSR_LOCK", Path(__file__).resolve().parents[1] / "constraints.txt"))
USERS_OWN_TORCH = {"torch", "torchvision"}  # a GPU user's own build replaces these two


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
            assert match, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def dependency_closure(root: str, extras: set[str]) -> set[str]:
    """Every distribution ``root[extras]`` needs on this interpreter and platform, transitively."""
    seen: set[str] = set()
    pending = [(root, frozenset(extras))]
    while pending:
        name, wanted = pending.pop()
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not any(
                    requirement.marker.evaluate({**default_environment(), "extra": extra})
                    for extra in wanted | {""}):
                continue
            dependency = canonicalize_name(requirement.name)
            if dependency == canonicalize_name(root):  # moebsr[dev] -> moebsr[deploy]
                pending.append((root, frozenset(requirement.extras)))
            elif dependency not in seen:
                seen.add(dependency)
                pending.append((dependency, frozenset(requirement.extras)))
    return seen


def test_the_lock_pins_every_package_moebsr_with_its_test_extras_needs():
    missing = dependency_closure("moebsr", {"dev"}) - set(locked_versions())
    assert not missing, f"not in constraints.txt: {sorted(missing)}; run: bash scripts/update_lock.sh"
    assert {"torch", "timm", "accelerate", "datasets", "pytest"} <= set(locked_versions())


def test_the_environment_holds_the_locked_versions():
    """What CI proves: the suite ran on the locked versions (``bash scripts/setup.sh`` installs them)."""
    import torch
    from packaging.version import Version
    differing = []
    for name, version in locked_versions().items():
        if name in USERS_OWN_TORCH and torch.version.cuda is not None:
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "(not installed)"
        if installed == "(not installed)" or Version(installed).public != Version(version).public:
            differing.append(f"{name} {installed} (locked {version})")
    assert not differing, f"not the locked versions: {differing}; run: bash scripts/setup.sh"
