"""``moebsr export``: one task of a training run as its own model folder, optionally pruned (and healed), or ONNX.

Nothing is written to ``--out`` until the whole export exists and was measured: the folder is assembled in a
hidden staging folder beside it (weights, config, ONNX graph and its check), evaluated from there (so the card's
accuracy is that of the files shipped), and only then moved in.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from safetensors.torch import save_file

from ..config import RunConfig, config_from_dict, config_to_dict
from ..errors import require_extra
from ..model import MoEViT
from ..model.prune import (
    CRITERIA,
    DEFAULT_CRITERION,
    DEFAULT_THRESHOLDS,
    choose_layer_experts,
    measure_routing_mass,
    moe_parameter_count,
    prune_experts,
)
from ..training.export import (
    BACKBONE_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    card_value,
    contiguous_state,
    find_weights,
    load_weights,
    read_run_document,
)
from .bundle import (
    FORMATS,
    ONNX_FILE,
    ExportError,
    check_out_dir,
    export_structure,
    human_bytes,
    is_plain_vit,
    move_into,
    task_config,
    timm_create_call,
    timm_state_dict,
)
from .card import describe_layers, task_card
from .extract import extract_task
from .heal import DEFAULT_HEAL_LOSS, HEAL_LOSSES, heal_task_model
from .onnx_export import DEFAULT_TOLERANCE, check_onnx, covering_images, export_onnx

ONNX_CHECK_IMAGES = 32  # images the ONNX check runs, chosen to reach every kept expert
SAMPLE_IMAGES = 512  # training images those (and the FLOPs batch, and the trace input) come from


@dataclass
class SourceRun:
    """A training run opened for export: its model (weights loaded, torch MoE backend, CPU) and what describes it."""

    folder: Path
    model: MoEViT
    config: RunConfig
    document: dict[str, Any]
    weights: Path


@dataclass
class ExportReport:
    """What an export wrote and measured; ``section`` is the ``export`` section of the folder's ``config.json``."""

    out: Path
    section: dict[str, Any]
    metrics: dict[str, float]


def open_source_run(run_dir: str | os.PathLike) -> SourceRun:
    """The training run to export from; an exported task folder is refused (export from its run)."""
    from ..training.build import model_for_run
    from ..training.run_data import RunData

    document = read_run_document(run_dir)
    if "export" in document:
        raise ExportError(f"--run: {os.fspath(run_dir)!r} is an exported task model; accepted: the training run it "
                          f"was exported from ({document['export'].get('source_run', '?')})")
    config = config_from_dict(document["config"])
    config.moe.backend = "torch"  # the same state-dict keys; a deployed model runs on one device
    data = RunData.from_config(config, check_data=False)
    model = model_for_run(config, {**document["task_outputs"], **data.heads()}, document)
    weights = find_weights(run_dir)
    load_weights(model, weights)
    return SourceRun(Path(run_dir), model.eval(), config, document, weights)


def task_images(config: RunConfig, task: str, split: str, image_spec: dict, batch_size: int,
                max_examples: Optional[int] = None) -> Iterator[torch.Tensor]:
    """``task``'s images of ``split`` as the model takes them (no augmentation), in the split's order."""
    from ..data import build_task_loader
    from ..training.run_data import RunData

    data = RunData.from_config(config_from_dict({**config_to_dict(config), "tasks": [task]}), check_data=False)
    loader = build_task_loader(data.tasks[task], split, image_spec, batch_size, train=False)
    seen = 0
    for batch in loader:
        images = batch["images"] if max_examples is None else batch["images"][:max_examples - seen]
        seen += images.shape[0]
        yield images
        if max_examples is not None and seen >= max_examples:
            return


def check_options(fmt: str, prune: bool, criterion: Optional[str], threshold: Optional[float],
                  calibration_examples: Optional[int], tolerance: float, heal_steps: int = 0,
                  heal_lr: Optional[float] = None, heal_loss: Optional[str] = None) -> None:
    """Every option checked before anything is loaded, in one line naming the option and what it accepts."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: {fmt!r} is invalid; accepted: {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_extra("deploy", "--format onnx", "onnx", "onnxscript", "onnxruntime", otherwise="--format safetensors")
    if not prune and (criterion is not None or threshold is not None or calibration_examples is not None):
        raise ExportError("--criterion/--threshold/--calibration-examples: do nothing without --prune; accepted: add "
                          "--prune, or leave them out")
    if criterion is not None and criterion not in CRITERIA:
        raise ExportError(f"--criterion: {criterion!r} is invalid; accepted: {', '.join(CRITERIA)}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ExportError(f"--threshold: {threshold!r} is invalid; accepted: a number in [0, 1]")
    if calibration_examples is not None and calibration_examples < 1:
        raise ExportError(f"--calibration-examples: {calibration_examples} is invalid; accepted: an integer >= 1")
    if not tolerance > 0:
        raise ExportError(f"--tolerance: {tolerance!r} is invalid; accepted: a number > 0")
    if isinstance(heal_steps, bool) or not isinstance(heal_steps, int) or heal_steps < 0:
        raise ExportError(f"--heal-steps: {heal_steps!r} is invalid; accepted: an integer >= 0 (0: no heal)")
    if heal_steps and not prune:
        raise ExportError(f"--heal-steps: {heal_steps} heals a pruned model and does nothing without --prune; "
                          "accepted: add --prune, or leave --heal-steps out")
    if heal_lr is not None and not heal_lr > 0:
        raise ExportError(f"--heal-lr: {heal_lr!r} is invalid; accepted: a number > 0")
    if heal_lr is not None and not heal_steps:
        raise ExportError("--heal-lr: does nothing without --heal-steps; accepted: add --heal-steps N (N >= 1), or "
                          "leave --heal-lr out")
    if heal_loss is not None and heal_loss not in HEAL_LOSSES:
        raise ExportError(f"--heal-loss: {heal_loss!r} is invalid; accepted: {', '.join(HEAL_LOSSES)}")
    if heal_loss is not None and not heal_steps:
        raise ExportError("--heal-loss: does nothing without --heal-steps; accepted: add --heal-steps N (N >= 1), or "
                          "leave --heal-loss out")


def export_task(run_dir: str | os.PathLike, task: str, out: str | os.PathLike, *, prune: bool = False,
                criterion: Optional[str] = None, threshold: Optional[float] = None, fmt: str = "safetensors",
                overwrite: bool = False, calibration_examples: Optional[int] = None,
                tolerance: float = DEFAULT_TOLERANCE, batch_size: Optional[int] = None,
                command: Optional[Sequence[str]] = None, heal_steps: int = 0,
                heal_lr: Optional[float] = None, heal_loss: Optional[str] = None,
                heal_seed: Optional[int] = None) -> ExportReport:
    """Write ``task`` of the run in ``run_dir`` as a task folder in ``out`` (see the module doc) and measure it.

    ``heal_steps`` > 0 (with ``prune``): fine-tune the pruned model that many steps on the task's training split
    before it is written (:mod:`moebsr.deploy.heal`; ``heal_lr`` defaults to a tenth of the run's ``train.lr``,
    ``heal_loss`` to ``distill``: towards the task model as it was before pruning; ``heal_seed`` to the run's seed).
    """
    from ..tasks import TaskError
    from ..training.build import image_spec_of

    check_options(fmt, prune, criterion, threshold, calibration_examples, tolerance, heal_steps, heal_lr, heal_loss)
    source = open_source_run(run_dir)
    if task not in source.config.tasks:
        raise TaskError(f"--task: unknown task {task!r}; this run has: {', '.join(source.config.tasks)}")
    out = Path(out)
    check_out_dir(out, source.folder, overwrite)
    batch_size = batch_size or source.config.eval.batch_size
    image_spec = image_spec_of(source.model)

    single = extract_task(source.model, task)
    heal_loss = heal_loss or DEFAULT_HEAL_LOSS
    teacher = copy.deepcopy(single) if heal_steps and heal_loss == "distill" else None
    pruning = None
    if prune:
        criterion = criterion or DEFAULT_CRITERION
        threshold = DEFAULT_THRESHOLDS[criterion] if threshold is None else threshold
        calibration = task_images(source.config, task, "train", image_spec, batch_size, calibration_examples)
        mass = measure_routing_mass(single, task, calibration)
        prune_experts(single, choose_layer_experts({index: measured.share for index, measured in mass.items()},
                                                   criterion, threshold))
        pruning = {"criterion": criterion, "threshold": threshold, "calibration_split": "train",
                   "calibration_images": next(iter(mass.values())).images if mass else 0,
                   "routing_mass": {str(index): measured.to_dict() for index, measured in mass.items()}}
    healing = heal_task_model(single, source.config, task, heal_steps, heal_lr, teacher,
                              heal_seed).to_dict() if heal_steps else None
    del teacher
    sample = next(task_images(source.config, task, "train", image_spec, SAMPLE_IMAGES, SAMPLE_IMAGES))

    staging = out.parent / f".{out.name}.export-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        section = write_task_folder(staging, source, single, task, out, sample, fmt, tolerance)
        section.update(pruning=pruning, command=shlex.join(command) if command else None)
        if healing is not None:  # only then: without a heal the folder is what it was before heals existed
            section["heal"] = healing
        metrics = measure_task_folder(staging, out, source, task, section, batch_size)
        move_into(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportReport(out, section, metrics)


def write_task_folder(folder: Path, source: SourceRun, single: MoEViT, task: str, out: Path, sample: torch.Tensor,
                      fmt: str, tolerance: float) -> dict[str, Any]:
    """The weights (and timm twin, and ONNX graph checked in onnxruntime) in ``folder``; returns the ``export``
    section as far as it is known before evaluation."""
    from ..analysis.profiling import inference_flops

    model = source.model
    save_file(contiguous_state(single.state_dict()), str(folder / MODEL_FILE),
              metadata={"format": "pt", "library": "moebsr"})
    plain = is_plain_vit(single)
    if plain:
        save_file(timm_state_dict(single), str(folder / BACKBONE_FILE), metadata={"format": "pt"})
    onnx_check = None
    if fmt == "onnx":
        export_onnx(single, task, folder / ONNX_FILE, sample[:2])
        check_images = covering_images(single, task, sample, min(ONNX_CHECK_IMAGES, sample.shape[0]))
        check = check_onnx(folder / ONNX_FILE, single, task, check_images, tolerance)
        if not check.passed:
            raise ExportError(f"--format onnx: onnxruntime's logits differ from PyTorch's by {check.max_abs_diff:.3g} "
                              f"(over --tolerance {tolerance:g}); nothing was written to {os.fspath(out)!r}")
        onnx_check = check.to_dict()
    moe_blocks = list(model.moe_blocks)
    num_experts = {index: layer.num_experts for index, layer in model.moe_layers().items()}
    flops_images = sample[:8]
    return {
        "task": task, "source_run": os.fspath(source.folder.resolve()),
        "source_weights": os.fspath(source.weights.resolve()),
        "moe_blocks": moe_blocks, "num_experts": {str(k): v for k, v in num_experts.items()},
        **export_structure(single, moe_blocks, num_experts),
        "removed_tasks": [t for t in model.task_names if t != task], "merged_adapters": merged_adapters(model),
        "token_drop_blocks": list(single.token_drop_blocks),
        "parameters": {"multitask": _count(model), "task_model": _count(single)},
        "moe_parameters": {"multitask": moe_parameter_count(model, moe_blocks),
                           "task_model": moe_parameter_count(single, moe_blocks)},
        "inference_flops_per_image": {
            "multitask": inference_flops(model, flops_images, task) / flops_images.shape[0],
            "task_model": inference_flops(single, flops_images, task) / flops_images.shape[0]},
        "onnx": onnx_check,
        "timm": {"file": BACKBONE_FILE,
                 "create": timm_create_call(source.config.model, single.heads[task].out_features),
                 "token_dropping": bool(single.token_drop_blocks)} if plain else None,
        "bytes": {"multitask": source.weights.stat().st_size,
                  **{name: (folder / name).stat().st_size for name in (MODEL_FILE, BACKBONE_FILE, ONNX_FILE)
                     if (folder / name).is_file()}},
    }


def measure_task_folder(folder: Path, out: Path, source: SourceRun, task: str, section: dict[str, Any],
                        batch_size: int) -> dict[str, float]:
    """Evaluate the task folder's files and the multitask model on the task's test split; write the config and the
    card with what was measured. Returns the task model's metrics."""
    from ..training.evaluate import evaluate_run

    exported_config = task_config(source.config, task, out)
    document = dict(config=config_to_dict(exported_config), task_outputs={task: source.document["task_outputs"][task]},
                    class_names={t: n for t, n in source.document.get("class_names", {}).items() if t == task},
                    metrics={}, library="moebsr", export=section)
    (folder / CONFIG_FILE).write_text(json.dumps(document, indent=2))
    metrics = evaluate_run(str(folder), [task], batch_size=batch_size)[task]
    section["metrics_multitask"] = evaluate_run(str(source.folder), [task], batch_size=batch_size)[task]
    document["metrics"] = {task: metrics}
    (folder / CONFIG_FILE).write_text(json.dumps(document, indent=2))
    (folder / "README.md").write_text(task_card(exported_config, section, metrics,
                                                document["class_names"].get(task)))
    return metrics


def merged_adapters(model: MoEViT) -> dict[str, int]:
    """How many layers of the multitask model carried task adapters and shared LoRA (merged in the export)."""
    from peft.tuners.lora import LoraLayer

    from ..model.adapters import TaskLoRALinear
    return {"task_adapters": sum(isinstance(m, TaskLoRALinear) for m in model.modules()),
            "lora": sum(isinstance(m, LoraLayer) for m in model.modules())}


def _count(model: MoEViT) -> int:
    return sum(p.numel() for p in model.parameters())


def format_report(report: ExportReport) -> str:
    """What ``moebsr export`` prints: what was kept, its cost against the multitask model, its measured accuracy."""
    section = report.section
    parameters, moe, sizes = section["parameters"], section["moe_parameters"], section["bytes"]
    pruning = section["pruning"]
    how = f" (pruned: {pruning['criterion']} {pruning['threshold']:g})" if pruning else ""
    if section.get("heal"):
        how = how[:-1] + (f"; healed: {section['heal']['steps']} steps at lr {section['heal']['lr']:g}, "
                          f"{section['heal']['loss']} loss)")
    onnx_size = f"; {ONNX_FILE} {human_bytes(sizes[ONNX_FILE])}" if ONNX_FILE in sizes else ""
    measured = ", ".join(f"{name} {card_value(name, value)} (multitask "
                         f"{card_value(name, section['metrics_multitask'].get(name))})"
                         for name, value in report.metrics.items() if name != "examples")
    lines = [
        f"exported {section['task']} to {report.out}: {describe_layers(section)}{how}",
        f"parameters {parameters['task_model']:,} (multitask {parameters['multitask']:,}, "
        f"{parameters['multitask'] / parameters['task_model']:.2f}x fewer); MoE layers {moe['task_model']:,} "
        f"(multitask {moe['multitask']:,}, {moe['multitask'] / max(1, moe['task_model']):.2f}x fewer)",
        f"{MODEL_FILE} {human_bytes(sizes[MODEL_FILE])} (multitask {human_bytes(sizes['multitask'])}){onnx_size}",
        f"test {measured} on {int(report.metrics['examples'])} examples, measured on the exported files",
    ]
    if section["onnx"]:
        check = section["onnx"]
        reach = "every kept expert" if check["reaches_every_kept_expert"] else "only some kept experts"
        lines.append(f"onnx: max abs logit diff vs PyTorch {check['max_abs_diff']:.3g} (tolerance "
                     f"{check['tolerance']:g}) on {check['images']} images reaching {reach}")
    if section["timm"]:
        lines.append(f"timm: {BACKBONE_FILE} loads with {section['timm']['create']}")
    return "\n".join(lines)
