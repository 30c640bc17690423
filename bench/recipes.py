"""The fine-tuning recipes the benchmarks compare, as config overrides on top of ``configs/quickstart.yaml``.

Block indices are left to scale with depth (the paper's MoE 3/7/11, BSR 3/7/11, dropping 3/6/9 at depth 12), so
the same recipes run on the 6-block quickstart model and on 12-block ViT-Tiny, DeiT-S and ViT-B.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Union

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "quickstart.yaml"
PRETRAIN_CONFIG = REPO / "configs" / "pretrain.yaml"


def backbone_arch() -> dict[str, int]:
    """The committed backbone's timm architecture arguments, read from the config that pretrains it."""
    from omegaconf import OmegaConf
    model = OmegaConf.load(PRETRAIN_CONFIG).model
    return {key: int(model[key]) for key in ("img_size", "patch_size", "depth", "embed_dim", "num_heads")}

SIZES = {
    "quickstart": [],  # the quickstart model: 6 blocks, width 128, 28 px, patch 7
    # the quickstart model at the paper's depth, from its own formula-pretrained backbone (the paper's blocks unscaled)
    "formula12": ["model.depth=12", "model.checkpoint=backbones/formula_vit_12x128_28px.safetensors"],
    "tiny": ["model.name=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=4", "model.depth=12",
             "model.embed_dim=192", "model.num_heads=3"],
    "deit_s": ["model.name=deit_small_patch16_224", "model.img_size=224", "model.patch_size=16", "model.depth=12",
               "model.embed_dim=384", "model.num_heads=6"],
    "vit_b": ["model.name=vit_base_patch16_224", "model.img_size=224", "model.patch_size=16", "model.depth=12",
              "model.embed_dim=768", "model.num_heads=12"],
}
# the paper's MoE (16 experts, top-4, one gate per task) and dropping (keep 0.5, fused), blocks scaled to depth
COMMON = ["moe.blocks=null", "moe.num_experts=16", "moe.top_k=4", "moe.router=task", "token_drop.blocks=null",
          "token_drop.decision=shared",
          "token_drop.keep_rate=0.5", "token_drop.fuse=true"]
NO_DROP = ["token_drop.enabled=false"]
DROP = ["token_drop.enabled=true"]
DENSE = ["moe.blocks=[]"]


def last_blocks_moe(*overrides: str) -> Callable[[int], list[str]]:
    """A recipe with MoE only in the last 3 blocks, the ones it trains: a frozen MoE block of upcycled experts
    computes the dense MLP again (renormalised gates), so routing there costs and splits the task streams for
    nothing. Its block list depends on the depth, so the recipe is a function of it."""
    return lambda depth: [*overrides, f"moe.blocks=[{','.join(map(str, range(depth - 3, depth)))}]"]


def last_moe_block_routes_per_task(*overrides: str) -> Callable[[int], list[str]]:
    """A recipe with one gate per task only in the last of the paper's MoE blocks (the others share one gate), so a
    joint batch of T tasks keeps one shared stream up to there."""
    def resolve(depth: int) -> list[str]:
        from moebsr.model.spec import PAPER_MOE_BLOCKS, scale_block_indices
        return [*overrides, f"moe.task_router_blocks=[{scale_block_indices(PAPER_MOE_BLOCKS, depth)[-1]}]"]
    return resolve


LAST_3 = ["bsr.preset=last_k", "bsr.last_k=3"]
RECIPES: dict[str, Union[list[str], Callable[[int], list[str]]]] = {
    "full": ["bsr.preset=all", *NO_DROP],
    "full_drop": ["bsr.preset=all", *DROP],
    "head_only": ["bsr.preset=none", *NO_DROP],
    "last_3": ["bsr.preset=last_k", "bsr.last_k=3", *NO_DROP],
    "paper_bsr": ["bsr.preset=paper", *DROP],
    "paper_bsr_per_task": ["bsr.preset=paper", *DROP, "token_drop.decision=per_task"],
    "paper_bsr_frozen_experts": ["bsr.preset=paper", "bsr.sublayers=[attn,router,norm]", *DROP],
    "bsr_last_3": ["bsr.preset=last_k", "bsr.last_k=3", *DROP],
    "bsr_no_drop": ["bsr.preset=paper", *NO_DROP],
    "paper_bsr_recompute": ["bsr.preset=paper", *DROP, "moe.recompute_experts=true"],
    "paper_bsr_lean_memory": ["bsr.preset=paper", *DROP, "moe.recompute_experts=true", "bsr.frozen_dtype=bf16"],
    # paper BSR plus one LoRA delta per task (rank 4) on the attention of the trained blocks (all MoE here)
    "paper_bsr_task_adapters": ["bsr.preset=paper", *DROP, "adapters.enabled=true"],
    "lora_paper_blocks": ["bsr.preset=none", "lora.enabled=true", "lora.blocks=null", *NO_DROP],
    "dense_full": [*DENSE, "bsr.preset=all", *NO_DROP],
    "dense_last_3": [*DENSE, "bsr.preset=last_k", "bsr.last_k=3", *NO_DROP],
    "dense_paper_bsr": [*DENSE, "bsr.preset=paper", *DROP],
    "dense_lora_paper_blocks": [*DENSE, "bsr.preset=none", "lora.enabled=true", "lora.blocks=null", *NO_DROP],
    "paper_bsr_shared_gate": ["bsr.preset=paper", *DROP, "moe.router=shared"],
    "paper_bsr_last_task_gate": last_moe_block_routes_per_task("bsr.preset=paper", *DROP),
    "last_3_moe_drop": last_blocks_moe(*LAST_3, *DROP),
    "lean": last_blocks_moe(*LAST_3, *DROP, "moe.recompute_experts=true"),
    # each with one change: the experts as rank-8 deltas of their one frozen upcycled MLP (moe.expert_rank)
    "paper_bsr_low_rank": ["bsr.preset=paper", *DROP, "moe.expert_rank=8"],
    "lean_low_rank": last_blocks_moe(*LAST_3, *DROP, "moe.recompute_experts=true", "moe.expert_rank=8"),
}


def depth_of(size: str) -> int:
    overrides = dict(item.split("=", 1) for item in SIZES[size])
    return int(overrides.get("model.depth", backbone_arch()["depth"]))


def recipe_overrides(size: str, recipe: str) -> list[str]:
    overrides = RECIPES[recipe]
    return SIZES[size] + COMMON + (overrides(depth_of(size)) if callable(overrides) else overrides)


def backbone_digest(overrides: list[str]) -> str:
    """The backbone file's SHA-256: a cached run is only reused for the same backbone weights."""
    sys.path.insert(0, str(REPO))
    from moebsr.config import load_config
    checkpoint = load_config(BASE_CONFIG, overrides).model.checkpoint
    if checkpoint is None:
        return "none"
    path = Path(checkpoint) if Path(checkpoint).is_absolute() else REPO / checkpoint
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_settings(overrides: list[str]) -> str:
    """What identifies a cached run: its overrides, the base config's text and the backbone weights' digest."""
    return json.dumps({"overrides": overrides, "config": BASE_CONFIG.read_text(),
                       "backbone_sha256": backbone_digest(overrides)}, indent=1)


def cached_run(output: Path, overrides: list[str], label: str, threads: int = 1) -> dict[str, dict[str, float]]:
    """Per-task metrics of a quickstart-config training run into ``output`` with ``overrides`` (which must set
    ``train.output_dir`` to it), trained only when ``output`` holds no finished run of exactly these settings
    (:func:`run_settings`), so an interrupted benchmark resumes. ``threads``: torch's CPU threads for the run (one: two
    such runs share 2 cores without spin-waiting, and results depend on it at ~1e-7). The run's stdout is kept in
    ``output/stdout.txt`` (what it printed at the end, e.g. the trunk cache's line)."""
    metrics_file, settings_file = output / "metrics.json", output / "overrides.json"
    settings = run_settings(overrides)
    if not (metrics_file.is_file() and settings_file.is_file() and settings_file.read_text() == settings):
        if output.exists():
            shutil.rmtree(output)  # a run of other settings (or an unfinished one): not this run's result
        print(f"{label} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=str(threads))
        result = subprocess.run([sys.executable, str(REPO / "launch" / "multitask.py"), "--config", str(BASE_CONFIG),
                                 *overrides], check=True, env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
        (output / "stdout.txt").write_text(result.stdout)
        (output / "wall_s.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
        settings_file.write_text(settings)
    return json.loads(metrics_file.read_text())["metrics"]
