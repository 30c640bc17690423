"""The model card of an exported task model: what was kept, what it costs against the multitask model, and its
test accuracy as measured on the exported files."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from ..config import RunConfig, TokenDropConfig
from ..training.export import MODEL_FILE, card_value, format_class_names
from .bundle import BACKBONE_FILE, CARD_TITLE, ONNX_FILE, human_bytes


def describe_layers(section: Mapping[str, Any]) -> str:
    """``block 1 3/8 experts, block 3 dense (expert 5)``: what each MoE layer of the multitask model became."""
    parts = []
    for block, experts in section["kept_experts"].items():
        if int(block) in section["dense_blocks"]:
            parts.append(f"block {block} dense (expert {experts[0]})")
        else:
            parts.append(f"block {block} {len(experts)}/{section['num_experts'][block]} experts")
    return ", ".join(parts) or "no MoE layer"


def _ratio(multitask: float, task_model: float) -> str:
    return f"{multitask / task_model:.2f}x" if task_model else "-"


def task_card(config: RunConfig, section: Mapping[str, Any], metrics: Mapping[str, float],
              class_names: Optional[Sequence[str]] = None) -> str:
    task = section["task"]
    parameters, moe, flops, sizes = (section[key] for key in ("parameters", "moe_parameters",
                                                              "inference_flops_per_image", "bytes"))
    merged = section["merged_adapters"]
    adapters = (f"its task adapters ({merged['task_adapters']} layers)" if merged["task_adapters"] else
                f"the shared LoRA ({merged['lora']} layers)" if merged["lora"] else "no adapter")
    lines = [f"{CARD_TITLE} {task}", "",
             f"Task `{task}` of the multitask run `{section['source_run']}` (weights `{section['source_weights']}`), "
             f"alone: its head, its gate in every MoE layer (the shared one where a layer has one), {adapters} merged "
             "into the weights; the other tasks' "
             f"heads, gates and adapters are gone ({', '.join(section['removed_tasks']) or 'none'}).", ""]
    if section.get("command"):
        lines += [f"Made by `{section['command']}`.", ""]
    lines.append(f"- MoE layers: {describe_layers(section)}; experts kept (original indices): "
                 + "; ".join(f"block {b}: {e}" for b, e in section["kept_experts"].items()))
    pruning = section.get("pruning")
    if pruning:
        rule = {"share": f"experts with at least {pruning['threshold']:g} of the layer's routing mass",
                "coverage": f"the fewest experts covering {pruning['threshold']:g} of the layer's routing mass",
                "budget": f"{pruning['threshold']:g} of all experts, those with the most share of their layer's "
                          "routing mass (at least one per layer)"}[pruning["criterion"]]
        lines.append(f"- pruning: kept {rule}, measured by this task's gate over {pruning['calibration_images']:,} "
                     f"{pruning['calibration_split']} images")
        for block, measured in pruning["routing_mass"].items():
            shares = ", ".join(f"{share:.3f}" for share in measured["share"])
            lines.append(f"  - block {block} routing-mass shares per expert: {shares}")
    else:
        lines.append("- pruning: none (every expert kept)")
    if section.get("heal"):
        lines.append(_heal_line(section["heal"]))
    lines.append(_dropping_line(config.token_drop, section))
    lines += ["", "| | multitask model | this model | multitask / this |", "|---|---|---|---|",
              f"| parameters | {parameters['multitask']:,} | {parameters['task_model']:,} | "
              f"{_ratio(parameters['multitask'], parameters['task_model'])} |",
              f"| MoE-layer parameters (blocks {section['moe_blocks']}) | {moe['multitask']:,} | {moe['task_model']:,} "
              f"| {_ratio(moe['multitask'], moe['task_model'])} |",
              f"| weights file | {human_bytes(sizes['multitask'])} | {human_bytes(sizes[MODEL_FILE])} | "
              f"{_ratio(sizes['multitask'], sizes[MODEL_FILE])} |",
              f"| inference GFLOPs per image | {flops['multitask'] / 1e9:.4f} | {flops['task_model'] / 1e9:.4f} | "
              f"{_ratio(flops['multitask'], flops['task_model'])} |"]
    for name, value in metrics.items():
        if name != "examples":
            lines.append(f"| test {name} ({int(metrics['examples'])} examples) | "
                         f"{card_value(name, section['metrics_multitask'].get(name))} | {card_value(name, value)} | |")
    lines += ["", "Both accuracies were measured when this folder was written: the task model from these files, the "
              "multitask model from its run, on the same test split.", ""]
    if section.get("onnx"):
        check = section["onnx"]
        lines += [f"- ONNX: `{ONNX_FILE}` ({human_bytes(sizes.get(ONNX_FILE))}), input `images` "
                  f"[batch, C, H, W] normalised as for the model, output `logits`; onnxruntime matches PyTorch to a "
                  f"max abs logit difference of {check['max_abs_diff']:.3g} (tolerance {check['tolerance']:g}) on "
                  f"{check['images']} training images chosen so that their tokens reach "
                  f"{'every kept expert' if check['reaches_every_kept_expert'] else 'some of the kept experts'}."]
    if section.get("timm"):
        caveat = ("timm's ViT does not drop tokens, so its logits equal this model's only with token dropping off "
                  "(`--keep-rate 1`)" if section["timm"]["token_dropping"] else "the logits are this model's")
        lines += [f"- timm: every MoE layer became dense, so `{BACKBONE_FILE}` is a plain timm ViT with its head: "
                  f"`{section['timm']['create']}`; {caveat}."]
    if class_names:
        lines += [f"- classes: {format_class_names(class_names)}"]
    lines += ["", "Use: `moebsr eval --run <this folder>`, `moebsr predict --run <this folder> IMAGE...`."]
    return "\n".join(lines) + "\n"


def _heal_line(heal: Mapping[str, Any]) -> str:
    """What the heal did, and what it means: the weights are no longer the run's."""
    loss = ("the task loss on its labels" if heal["loss"] == "task" else
            "a distillation loss towards the task model before pruning")
    return (f"- healed after pruning: fine-tuned {heal['steps']} steps on the task's {heal['split']} split "
            f"(batch {heal['batch_size']}, augmentation {heal['augmentation']}; {heal['optimizer']} at lr "
            f"{heal['lr']:g}, {heal['schedule']}, weight decay {heal['weight_decay']:g}, seed {heal['seed']}), "
            f"training the {heal['trainable_parameters']:,} parameters the run trained for this task (its BSR "
            f"blocks, the kept gates, the head) on {loss}: {heal['loss_first']:.4f} over the first steps, "
            f"{heal['loss_last']:.4f} over the last. So this model no longer computes the multitask model's function "
            "for the task exactly: its trainable blocks and head were changed after export (the routing mass above "
            "was measured before the heal).")


def _dropping_line(token_drop: TokenDropConfig, section: Mapping[str, Any]) -> str:
    if not token_drop.enabled:
        return "- token dropping: off"
    return (f"- token dropping (as trained): blocks {section['token_drop_blocks']}, keep rate {token_drop.keep_rate}, "
            f"fuse {token_drop.fuse}, decision `{token_drop.decision}`"
            + (f", ranked by block {section['ranking_block']}'s attention as in the multitask model"
               if section.get("ranking_block") is not None else ""))
