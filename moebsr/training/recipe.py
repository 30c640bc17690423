"""What a run trains, in one short block: printed when training starts and by ``moebsr profile``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Optional

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..model import MoEViT


def describe_recipe(config: "RunConfig", model: "MoEViT", task_sizes: Optional[Mapping[str, Optional[int]]] = None,
                    task_outputs: Optional[Mapping[str, int]] = None) -> str:
    """Backbone, MoE, what trains, token dropping, optimisation and tasks; ``task_sizes``: training images."""
    patch_embed = model.backbone.patch_embed
    source = ("pretrained (timm)" if config.model.pretrained else
              f"weights {config.model.checkpoint}" if config.model.checkpoint else "random init")
    moe = config.moe
    per_task_only = f" in blocks {list(moe.task_router_blocks)}" if moe.task_router_blocks is not None else ""
    rank = f" (rank-{moe.expert_rank} deltas of one MLP)" if moe.expert_rank is not None else ""
    moe_line = (f"blocks {list(model.moe_blocks)} · {moe.num_experts} experts{rank}, top-{moe.top_k}, "
                f"router `{moe.router}`"
                f"{per_task_only}"
                f"{f', capacity factor {moe.capacity_factor:g}' if moe.capacity_factor is not None else ''}"
                f"{', padded dispatch' if moe.dispatch == 'padded' else ''}"
                f"{', ' + moe.backend + ' backend' if moe.backend != 'torch' else ''}"
                if model.moe_blocks else "none (dense)")
    plan = config.bsr.plan().resolve(model.depth)
    chosen_by = "`bsr.trainable_blocks`" if config.bsr.trainable_blocks is not None else f"preset `{config.bsr.preset}`"
    extras = [name for name, on in (("embeddings", plan.train_embeddings), ("final norm", plan.train_final_norm))
              if on]
    if plan.block_sublayers:  # a choice per block (what moebsr plan writes)
        trained = "blocks " + ", ".join(f"{block}: {'+'.join(sorted(plan.sublayers_of(block)))}"
                                        for block in plan.trainable_blocks) + " (`bsr.block_sublayers`)"
    else:
        trained = (f"blocks {list(plan.trainable_blocks)} ({chosen_by}; {', '.join(config.bsr.sublayers)})"
                   if plan.trainable_blocks else f"no block ({chosen_by})")
    if config.lora.enabled:
        trained += f" · LoRA rank {config.lora.rank} on {', '.join(config.lora.modules)}"
    if config.adapters.enabled:
        from ..model.adapters import TaskLoRALinear
        adapted = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if isinstance(module, TaskLoRALinear)})
        trained += (f" · task adapters rank {config.adapters.rank} on {', '.join(adapted)} of blocks "
                    f"{list(config.adapters_blocks(model.depth))}")
    trained += f" · {' and '.join(extras + ['heads'])}"
    drop = config.token_drop
    drop_line = (f"blocks {list(model.token_drop_blocks)} · keep {drop.keep_rate:g}"
                 f"{', fused' if drop.fuse else ''} · decision `{drop.decision}`" if drop.enabled else "off")
    train = config.train
    optimizer = (f"{train.optimizer} lr {train.lr:g}, weight decay {train.weight_decay:g}"
                 f"{f', layer decay {train.layer_decay:g}' if train.layer_decay else ''}"
                 f"{f', momentum {train.momentum:g}' if train.optimizer == 'sgd' else ''} · warm-up "
                 f"{train.warmup_steps} + cosine · {train.steps} steps of batch {train.batch_size}"
                 f"{f' x {train.grad_accum_steps} accumulated' if train.grad_accum_steps > 1 else ''} · precision "
                 f"{train.mixed_precision}")
    tasks = []
    for name in config.tasks:
        details = [f"{task_outputs[name]} outputs" if task_outputs and name in task_outputs else None,
                   f"{task_sizes[name]:,} train" if task_sizes and task_sizes.get(name) is not None else None]
        shown = ", ".join(d for d in details if d)
        tasks.append(f"{name} ({shown})" if shown else name)
    rows = [
        ("backbone", f"{config.model.name} · {model.depth} blocks, width {model.backbone.embed_dim} · "
                     f"{patch_embed.img_size[0]} px, patch {patch_embed.patch_size[0]} · {source}"),
        ("MoE", moe_line),
        ("trains", trained),
        ("token dropping", drop_line),
        ("tokens per block", " ".join(map(str, model.tokens_per_block()))),
        ("optimisation", optimizer),
        ("tasks", " · ".join(tasks)),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
