"""The folder of an exported task model: what it holds, how moebsr rebuilds it, and its timm twin.

A task folder is a run folder with one task: ``model.safetensors``, ``config.json`` (the run's config restricted to
the task, plus an ``export`` section saying which experts each MoE layer kept), a ``README.md`` card, and, when every
MoE layer became dense, ``backbone.safetensors`` (a plain timm ViT with its head, in timm's key layout). So
``moebsr eval``, ``predict`` and ``tokens`` take it as ``--run``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from ..config import ModelConfig, RunConfig, config_from_dict, config_to_dict
from ..model import MoEViT
from ..training.export import BACKBONE_FILE, CONFIG_FILE, MODEL_FILE, contiguous_state

ONNX_FILE = "model.onnx"
CARD_TITLE = "# moebsr task model:"
EXPORT_FILES = (MODEL_FILE, CONFIG_FILE, BACKBONE_FILE, ONNX_FILE, "README.md")
FORMATS = ("safetensors", "onnx")


class ExportError(ValueError):
    """An export that cannot be made as asked (bad option, folder in the way, failed check); one line says why."""


def task_config(config: RunConfig, task: str, output_dir: str | os.PathLike) -> RunConfig:
    """The run's config for ``task`` alone, as the exported weights need it: adapters merged (LoRA off), the torch
    MoE backend (one device; the state-dict keys are the same), only this task's data options."""
    exported = config_from_dict(config_to_dict(config))
    exported.tasks = [task]
    exported.data.task_options = {k: v for k, v in exported.data.task_options.items() if k == task}
    exported.lora.enabled = False
    exported.adapters.enabled = False
    exported.moe.backend = "torch"
    exported.moe.recompute_experts = False
    exported.train.output_dir = os.fspath(output_dir)
    exported.train.resume = None
    return exported


def export_structure(model: MoEViT, moe_blocks: list[int], num_experts: Mapping[int, int]) -> dict[str, Any]:
    """The ``export`` section's structure: which of each MoE layer's experts the task model kept, which layers
    became dense, and where the multitask model's task streams split (which fixes the block that ranks tokens)."""
    kept = {}
    for index in moe_blocks:
        mlp = model.blocks[index].mlp
        kept[str(index)] = list(getattr(mlp, "kept_experts", range(num_experts[index])))
    return {"kept_experts": kept, "dense_blocks": [i for i in moe_blocks if not model.blocks[i].is_moe],
            "split_point": list(model.origin_split_point) if model.origin_split_point else None,
            "ranking_block": model.ranking_block()}


def is_plain_vit(model: MoEViT) -> bool:
    """Every block dense and one linear head: the model is a timm ``VisionTransformer`` (but for token dropping)."""
    (head,) = model.heads.values()
    return not model.moe_blocks and type(head) is nn.Linear


def timm_state_dict(model: MoEViT) -> dict[str, torch.Tensor]:
    """The backbone and the task's head in timm's key layout (``blocks.0.mlp.fc1.weight``, ``head.weight``)."""
    if not is_plain_vit(model):
        raise ExportError("a timm state dict needs every MoE layer pruned to one expert and a linear head")
    (head,) = model.heads.values()
    return contiguous_state({**model.backbone.state_dict(), **{f"head.{k}": v for k, v in head.state_dict().items()}})


def timm_create_call(model_config: ModelConfig, num_classes: int, file: str = BACKBONE_FILE) -> str:
    """The ``timm.create_model`` call that loads ``backbone.safetensors`` with its head. ``num_classes`` goes into
    the overlay too: timm keeps a file's head only when the pretrained config's class count matches."""
    arch = {k: v for k, v in model_config.create_kwargs().items() if k != "drop_path_rate"}
    arguments = ", ".join(f"{k}={v!r}" for k, v in arch.items())
    return (f"timm.create_model({model_config.name!r}, pretrained=True, num_classes={num_classes}, {arguments}, "
            f"pretrained_cfg_overlay=dict(file={file!r}, num_classes={num_classes}))")


def check_out_dir(out: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds a training run (never cleared), or another export unless ``overwrite``."""
    if out.resolve() == run_dir.resolve():
        raise ExportError(f"--out: {os.fspath(out)!r} is the run folder itself; accepted: another folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out: {os.fspath(out)!r} is a file; accepted: a folder (new or holding an export)")
    if (out / "checkpoints").exists() or (out / "train_log.jsonl").exists():
        raise ExportError(f"--out: {os.fspath(out)!r} holds a training run; accepted: another folder (a training "
                          "run is never overwritten by an export)")
    found = [name for name in EXPORT_FILES if (out / name).exists() and name != "README.md"]
    if found and not overwrite:
        raise ExportError(f"--out: {os.fspath(out)!r} holds another export ({', '.join(found)}); accepted: a new "
                          "folder, or --overwrite to replace it")


def move_into(staging: Path, out: Path) -> None:
    """Replace ``out``'s export files by those in ``staging`` (each rename atomic; config.json last, so a folder
    with a new config.json holds the whole new export), and remove the export files the new export lacks."""
    out.mkdir(parents=True, exist_ok=True)
    names = [name for name in EXPORT_FILES if (staging / name).exists()]
    for name in EXPORT_FILES:
        if name not in names and (out / name).exists() and _is_export_file(out / name):
            (out / name).unlink()
    for name in sorted(names, key=lambda n: n == CONFIG_FILE):
        os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)


def _is_export_file(path: Path) -> bool:
    return path.name != "README.md" or path.read_text(errors="replace").startswith(CARD_TITLE)


def human_bytes(size: Optional[int]) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"
