"""Export a finished run (``model.safetensors`` + ``config.json`` + a model card) and load it back."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import RunConfig, config_from_dict, config_to_dict
from ..model import MoEViT
from .checkpoint import CheckpointError, list_checkpoints
from .expert_parallel import parameter_count

MODEL_FILE = "model.safetensors"
BACKBONE_FILE = "backbone.safetensors"
CONFIG_FILE = "config.json"
CARD_TITLE = "# moebsr run:"  # the model card's first line (``train.overwrite`` removes only such a README.md)


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(temporary)`` beside ``path``, then rename over it: readers see the old file or the whole new one."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text))


def contiguous_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().contiguous().cpu() for key, value in state.items()}


def export_run(output_dir: str | os.PathLike, model: MoEViT, config: RunConfig,
               task_outputs: Mapping[str, int], metrics: Mapping[str, Mapping[str, float]],
               state: Optional[Mapping[str, torch.Tensor]] = None,
               class_names: Optional[Mapping[str, Sequence[str]]] = None) -> Path:
    """Write the exported model. A dense model also gets ``backbone.safetensors`` in timm's key layout, which
    ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`` and ``model.checkpoint`` load.

    ``state`` is ``model.state_dict()`` taken beforehand on every process when experts are sharded across
    processes (gathering them is collective, and only the main process exports)."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    state = contiguous_state(model.state_dict() if state is None else state)
    write_atomically(output / MODEL_FILE, lambda temporary: save_file(
        state, str(temporary), metadata={"format": "pt", "library": "moebsr"}))
    if not model.moe_blocks:
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        write_atomically(output / BACKBONE_FILE,
                         lambda temporary: save_file(backbone, str(temporary), metadata={"format": "pt"}))
    write_run_document(output, config, task_outputs, metrics, class_names)
    write_text_atomically(output / "README.md", model_card(config, task_outputs, metrics, model, class_names))
    return output / MODEL_FILE


def write_run_document(output_dir: str | os.PathLike, config: RunConfig, task_outputs: Mapping[str, int],
                       metrics: Mapping[str, Mapping[str, float]],
                       class_names: Optional[Mapping[str, Sequence[str]]] = None) -> None:
    """``config.json``: the resolved config, each task's outputs and class names, known from step 0, so that an
    unfinished run can be evaluated from its newest checkpoint; the export adds the final metrics."""
    document = dict(config=config_to_dict(config), task_outputs=dict(task_outputs),
                    class_names={t: list(names) for t, names in (class_names or {}).items()},
                    metrics={t: dict(m) for t, m in metrics.items()}, library="moebsr")
    write_text_atomically(Path(output_dir) / CONFIG_FILE, json.dumps(document, indent=2))


def model_card(config: RunConfig, task_outputs: Mapping[str, int], metrics: Mapping[str, Mapping[str, float]],
               model: MoEViT, class_names: Optional[Mapping[str, Sequence[str]]] = None) -> str:
    trainable = parameter_count(p for p in model.parameters() if p.requires_grad)
    total = parameter_count(model.parameters())
    lines = [
        f"{CARD_TITLE} {Path(config.train.output_dir).name}", "",
        f"- backbone: `{config.model.name}` ({model.depth} blocks), MoE blocks {list(model.moe_blocks)} "
        f"({config.moe.num_experts} experts"
        f"{f' as rank-{config.moe.expert_rank} deltas' if config.moe.expert_rank is not None else ''}, "
        f"top-{config.moe.top_k}, router `{config.moe.router}`)",
        f"- trainable blocks: {list(config.bsr.plan().resolve(model.depth).trainable_blocks)} "
        f"({'`bsr.trainable_blocks`' if config.bsr.trainable_blocks is not None else f'preset `{config.bsr.preset}`'}"
        f"); trainable parameters {trainable:,} of {total:,}",
        f"- token dropping: blocks {list(model.token_drop_blocks)}, keep rate {config.token_drop.keep_rate}, "
        f"fuse {config.token_drop.fuse}" if config.token_drop.enabled else "- token dropping: off",
        f"- steps: {config.train.steps}, batch {config.train.batch_size}, lr {config.train.lr}, "
        f"sampler `{config.train.sampler}`", "",
        "| task | outputs | " + " | ".join(sorted({m for v in metrics.values() for m in v})) + " |",
    ]
    metric_names = sorted({m for v in metrics.values() for m in v})
    lines.append("|---|---|" + "---|" * len(metric_names))
    for task, outputs in task_outputs.items():
        values = [card_value(m, metrics.get(task, {}).get(m)) for m in metric_names]
        lines.append(f"| {task} | {outputs} | " + " | ".join(values) + " |")
    lines += [""] + [f"Classes of `{task}`: {format_class_names(names)}" for task, names in (class_names or {}).items()]
    lines += ["", "Evaluate: `moebsr eval --run <this folder>`."]
    return "\n".join(lines) + "\n"


def format_class_names(names: Sequence[str], shown: int = 20) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(map(str, names[:shown])) + more


def card_value(name: str, value: Optional[float]) -> str:
    """As the console prints it: counts as integers, a metric the task does not have as ``-``."""
    if value is None:
        return "-"
    return f"{int(value)}" if name == "examples" else f"{value:.4f}"


def read_run_document(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"--run: {os.fspath(run_dir)!r} has no {CONFIG_FILE}; accepted: a run folder written "
                              "by launch/multitask.py (it holds config.json and model.safetensors)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"--run: {path} is corrupt: {error}") from None


def find_weights(run_dir: str | os.PathLike) -> Path:
    """The exported weights, or those of the newest complete checkpoint of an unfinished run."""
    exported = Path(run_dir) / MODEL_FILE
    if exported.is_file():
        return exported
    checkpoints = list_checkpoints(run_dir)
    if checkpoints and (checkpoints[-1] / MODEL_FILE).is_file():
        return checkpoints[-1] / MODEL_FILE
    raise CheckpointError(f"--run: no {MODEL_FILE} in {os.fspath(run_dir)!r} nor in any complete checkpoint")


def load_weights(model: MoEViT, path: Path) -> None:
    """Load a state dict strictly; a truncated file or a different model config is refused, saying which."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"checkpoint {path}: corrupt or truncated file ({error})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        details = "; ".join(f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
                            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("wrong shape", wrong_shape)) if keys)
        raise CheckpointError(f"checkpoint {path}: does not match the model config ({details})")
    model.load_state_dict(state)


def load_exported_model(run_dir: str | os.PathLike, heads: Optional[Mapping[str, Any]] = None,
                        weights: Optional[Path] = None, device: Optional[torch.device | str] = None
                        ) -> tuple[MoEViT, RunConfig, dict[str, Any]]:
    """Rebuild the run's model from its config and load its weights (no pretrained download). ``device``: where
    the model lives; under several processes with tutel's sharded experts it must be the process's device,
    since loading reads the state dict, which all-gathers the experts."""
    from .build import model_for_run
    document = read_run_document(run_dir)
    config = config_from_dict(document["config"])
    model = model_for_run(config, heads or document["task_outputs"], document)
    if device is not None:
        model = model.to(device)
    load_weights(model, weights or find_weights(run_dir))
    return model, config, document
