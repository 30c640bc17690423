"""Run configuration: YAML files parsed into typed dataclasses, dotted ``key=value`` overrides, validation.

OmegaConf's structured configs give type checking and unknown-key rejection for free; this module turns its
errors into one line that names the key, the bad value and what is accepted, and adds the semantic checks
(ranges, presets) that need the model's depth, before any data or weights are loaded.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .model.bsr import BSRPlan
# model.spec and model.bsr import no torch (the model package loads its modules on first use): a config is parsed
# and refused without the heavy stack, which a bad key would otherwise wait seconds for on a loaded machine
from .model.spec import (ADAPTED_MODULES, FROZEN_DTYPE_NAMES, MoESpec, TokenDropSpec, check_block_indices,
                         check_decision, check_dispatch, check_keep_rate)

OPTIMIZERS = ("adamw", "sgd")
SAMPLERS = ("round_robin", "proportional", "temperature", "joint")
MIXED_PRECISION = ("no", "bf16", "fp16")
TRACKERS = ("tensorboard", "csv", "none")


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the key, the value and what is accepted."""


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16_224"
    pretrained: bool = False
    checkpoint: Optional[str] = None  # local backbone weights (timm-loadable safetensors)
    pretrain_config: Optional[str] = None  # config that produces `checkpoint` when it is missing
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    in_chans: Optional[int] = None
    depth: Optional[int] = None
    embed_dim: Optional[int] = None
    num_heads: Optional[int] = None
    drop_path_rate: float = 0.0
    # any other argument of timm's VisionTransformer, e.g. {class_token: false, global_pool: avg, reg_tokens: 4,
    # qk_norm: true, dynamic_img_size: true}; checked against its signature before anything is built
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)

    ARCHITECTURE_FIELDS = ("img_size", "patch_size", "in_chans", "depth", "embed_dim", "num_heads", "drop_path_rate")

    def create_kwargs(self) -> dict[str, Any]:
        """What ``timm.create_model`` gets besides the name: the fields above that are set, then ``timm_kwargs``."""
        kwargs = {name: getattr(self, name) for name in self.ARCHITECTURE_FIELDS
                  if name != "drop_path_rate" and getattr(self, name) is not None}
        if self.drop_path_rate:
            kwargs["drop_path_rate"] = self.drop_path_rate
        return {**kwargs, **self.timm_kwargs}


@dataclass
class MoEConfig(MoESpec):
    """:class:`MoESpec` plus the weight of its balancing loss in the training loss."""

    aux_loss_weight: float = 0.01

    def spec(self) -> MoESpec:
        fields = {f.name for f in dataclasses.fields(MoESpec)}
        return MoESpec(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})


@dataclass
class BSRConfig:
    preset: str = "paper"
    trainable_blocks: Optional[List[int]] = None
    last_k: int = 3
    sublayers: List[str] = field(default_factory=lambda: ["attn", "mlp", "router", "norm"])
    train_final_norm: Optional[bool] = None
    train_embeddings: Optional[bool] = None
    block_sublayers: Optional[Dict[int, List[str]]] = None  # per-block sub-layers (what `moebsr plan` writes)
    frozen_dtype: str = "fp32"  # bf16/fp16: frozen matmul weights stored (and computed) in it; see model/precision.py

    def plan(self) -> BSRPlan:
        fields = {f.name for f in dataclasses.fields(BSRPlan)}
        return BSRPlan(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})


@dataclass
class TokenDropConfig(TokenDropSpec):
    """:class:`TokenDropSpec` plus a switch: configs keep their dropping settings while it is off."""

    enabled: bool = False

    def spec(self) -> Optional[TokenDropSpec]:
        return TokenDropSpec(self.blocks, self.keep_rate, self.fuse, self.decision) if self.enabled else None


@dataclass
class LoRAConfig:
    """PEFT LoRA adapters, the parameter-efficient baseline; usually with ``bsr.preset: none``."""

    enabled: bool = False
    blocks: Optional[List[int]] = None  # None: the paper's blocks (3, 7, 11) scaled to depth
    modules: List[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0


TRUNK_CACHE_DTYPES = ("bf16", "fp16", "fp32")
TRUNK_CACHE_LOCATIONS = ("memory", "disk")


@dataclass
class TrunkCacheConfig:
    """Keep the frozen trunk's output per image (the blocks before the first trainable one compute the same thing
    every epoch), so later epochs skip it; see :mod:`moebsr.trunk_cache`."""

    enabled: bool = False
    dtype: str = "bf16"  # what the trunk's tokens are stored (and, hit or miss, rounded) in
    max_gib: float = 4.0  # bound per process; images past it are computed every time
    location: str = "memory"  # memory: on the training device; disk: memory-mapped files under output_dir/trunk_cache
    views: int = 0  # 0: training augmentation off; K >= 1: K fixed augmented views per image (epoch e: view e mod K)


@dataclass
class AdaptersConfig:
    """Per-task LoRA adapters: each task trains its own low-rank delta on the shared (BSR-trained) weights."""

    enabled: bool = False
    blocks: Optional[List[int]] = None  # None: the BSR plan's trainable blocks
    modules: List[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])  # fc1/fc2: dense MLPs only
    rank: int = 4
    alpha: float = 8.0


@dataclass
class DataConfig:
    task_dirs: List[str] = field(default_factory=list)  # extra folders of task files
    task_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # per-task factory options
    num_workers: int = 0


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 0.05
    layer_decay: Optional[float] = None
    optimizer: str = "adamw"
    momentum: float = 0.9
    steps: int = 100
    warmup_steps: int = 10
    grad_clip: Optional[float] = 1.0
    grad_accum_steps: int = 1
    mixed_precision: str = "no"
    sampler: str = "round_robin"
    temperature: float = 2.0
    label_smoothing: float = 0.0
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # a checkpoint folder or "latest"
    overwrite: bool = False  # clear another run's outputs from output_dir first (else such a folder is refused)
    max_bad_steps: int = 5  # consecutive non-finite losses before aborting


@dataclass
class EvalConfig:
    split: str = "test"
    every: int = 0  # 0: only at the end
    batch_size: int = 256
    max_examples: Optional[int] = None


@dataclass
class LoggingConfig:
    log_every: int = 10
    trackers: List[str] = field(default_factory=lambda: ["tensorboard"])
    progress: bool = True


@dataclass
class RunConfig:
    tasks: List[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    bsr: BSRConfig = field(default_factory=BSRConfig)
    token_drop: TokenDropConfig = field(default_factory=TokenDropConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    trunk_cache: TrunkCacheConfig = field(default_factory=TrunkCacheConfig)
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def adapters_blocks(self, depth: int) -> tuple[int, ...]:
        """The blocks that take task adapters: ``adapters.blocks``, or the BSR plan's trainable blocks."""
        if self.adapters.blocks is not None:
            return check_block_indices("adapters.blocks", self.adapters.blocks, depth)
        return self.bsr.plan().resolve(depth).trainable_blocks


def _omegaconf_message(error: OmegaConfBaseException, source: str) -> str:
    key = getattr(error, "full_key", None) or "?"
    message = (getattr(error, "msg", None) or str(error)).strip().splitlines()[0]
    if "not in struct" in message or ("Key '" in message and "not in" in message):
        section = _schema_section(key.rsplit(".", 1)[0] if "." in key else "")
        accepted = ", ".join(f.name for f in dataclasses.fields(section)) if section is not None else "see config.py"
        return f"{source}: unknown key {key!r}; accepted here: {accepted}"
    converted = re.search(r"could not be converted to (Integer|Float)|is not a valid (bool)", message)
    if converted:  # a value of the wrong type: say what the key takes
        accepted = {"Integer": "an integer", "Float": "a number", "bool": "true or false"}[converted[1] or converted[2]]
        return f"{source}: {key}: {message}; accepted: {accepted}"
    return f"{source}: {key}: {message}"


def _schema_section(section: str) -> Any:
    """The default dataclass instance at a dotted section of :class:`RunConfig`, or None."""
    node: Any = RunConfig()
    for part in filter(None, section.split(".")):
        node = getattr(node, part, None)
        if not dataclasses.is_dataclass(node):
            return None
    return node


# Files a config names. Relative paths written in a config file are relative to that file, so a run does not
# depend on the working directory; paths given as key=value overrides are relative to it, as on any command line.
# (train.output_dir is an output: relative to the working directory, like every tool's output folder.)
PATH_KEYS = ("model.checkpoint", "model.pretrain_config", "data.task_dirs")


def resolve_config_paths(layer: Any, path: Path) -> Any:
    """Rewrite ``PATH_KEYS`` in one YAML layer as absolute paths against the file's folder."""
    folder = path.resolve().parent
    for key in PATH_KEYS:
        value = OmegaConf.select(layer, key, default=None) if isinstance(layer, DictConfig) else None
        if isinstance(value, str):
            OmegaConf.update(layer, key, _against(folder, value))
        elif isinstance(value, ListConfig):
            OmegaConf.update(layer, key, [_against(folder, item) if isinstance(item, str) else item
                                          for item in value])
    return layer


def _against(folder: Path, value: str) -> str:
    return value if Path(value).is_absolute() else os.path.normpath(folder / value)


def load_config(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Parse a YAML file plus ``key=value`` overrides into a :class:`RunConfig` and validate it."""
    schema = OmegaConf.structured(RunConfig)
    layers = [schema]
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"--config: no file at {os.fspath(path)!r}")
        try:
            layers.append(resolve_config_paths(OmegaConf.load(path), Path(path)))
        except Exception as error:  # YAML syntax
            raise ConfigError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from error
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r}: expected key=value, e.g. train.steps=100")
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        from_override = key is not None and any(o.split("=", 1)[0].strip() == key for o in overrides)
        source = "override" if from_override or path is None else os.fspath(path)
        raise ConfigError(_omegaconf_message(error, source)) from None
    validate_config(config)
    check_overrides_take_effect(config, overrides)
    return config


# sections whose other keys act only while their `enabled` is true
SWITCHED_SECTIONS = ("token_drop", "lora", "trunk_cache", "adapters")


def check_overrides_take_effect(config: RunConfig, overrides: Sequence[str]) -> None:
    """An override that would silently do nothing is an error naming the key that would make it count."""
    keys = {override.split("=", 1)[0].strip(): override for override in overrides}
    for section in SWITCHED_SECTIONS:
        switch = f"{section}.enabled"
        if getattr(config, section).enabled or switch in keys:
            continue
        for key, override in keys.items():
            if key.startswith(f"{section}."):
                raise ConfigError(f"{override}: does nothing while {switch} is false; accepted: add {switch}=true, "
                                  f"or leave {key} out")
    if "bsr.last_k" in keys and (config.bsr.preset != "last_k" or config.bsr.trainable_blocks is not None):
        raise ConfigError(f"{keys['bsr.last_k']}: does nothing with bsr.preset={config.bsr.preset}"
                          f"{' and bsr.trainable_blocks set' if config.bsr.trainable_blocks is not None else ''}; "
                          "accepted: add bsr.preset=last_k, or leave bsr.last_k out")


def _choice(key: str, value: Any, accepted: Sequence[Any]) -> None:
    if value not in accepted:
        # YAML 1.1 reads yes/no/on/off/true/false as booleans, which reach a string setting as 'True'/'False'
        hint = " (YAML read a yes/no/on/off/true/false as a boolean)" if value in ("True", "False") else ""
        raise ConfigError(f"{key}: {value!r} is invalid{hint}; accepted: {', '.join(map(str, accepted))}")


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
    if value is None or (value < 0 if allow_zero else value <= 0):
        if isinstance(value, int) and not isinstance(value, bool):
            accepted = "an integer >= 0" if allow_zero else "an integer >= 1"
        else:
            accepted = f"a number {'>= 0' if allow_zero else '> 0'}"
        raise ConfigError(f"{key}: {value!r} is invalid; accepted: {accepted}")


def validate_config(config: RunConfig) -> None:
    """Checks that need no model or data. Model-shape checks run in :func:`validate_against_model`."""
    if not config.tasks:
        raise ConfigError("tasks: empty; accepted: a list of task names (see `moebsr tasks`)")
    if len(set(config.tasks)) != len(config.tasks):
        raise ConfigError(f"tasks: duplicate names in {config.tasks}")
    train = config.train
    _choice("train.optimizer", train.optimizer, OPTIMIZERS)
    _choice("train.sampler", train.sampler, SAMPLERS)
    if train.mixed_precision == "False":  # YAML 1.1 reads a bare `no` as false, which OmegaConf stores as "False"
        train.mixed_precision = "no"
    _choice("train.mixed_precision", train.mixed_precision, MIXED_PRECISION)
    for key in ("batch_size", "steps", "grad_accum_steps", "keep_checkpoints", "max_bad_steps"):
        _positive(f"train.{key}", getattr(train, key))
    for key in ("lr", "temperature"):
        _positive(f"train.{key}", getattr(train, key))
    for key in ("warmup_steps", "checkpoint_every", "weight_decay", "min_lr", "label_smoothing"):
        _positive(f"train.{key}", getattr(train, key), allow_zero=True)
    if train.warmup_steps and train.warmup_steps >= train.steps:  # the LR would never leave warm-up, nor decay
        raise ConfigError(f"train.warmup_steps: {train.warmup_steps} is not below train.steps={train.steps}, so the "
                          f"learning rate would never leave warm-up; accepted: 0 <= train.warmup_steps < "
                          f"{train.steps} (e.g. train.warmup_steps={train.steps // 20})")
    if train.min_lr > train.lr:
        raise ConfigError(f"train.min_lr: {train.min_lr!r} is above train.lr={train.lr!r}, so the cosine would rise; "
                          f"accepted: 0 <= train.min_lr <= train.lr")
    if train.grad_clip is not None:
        _positive("train.grad_clip", train.grad_clip)
    if train.overwrite and train.resume:
        raise ConfigError(f"train.overwrite: true would clear the run train.resume={train.resume!r} continues; "
                          "accepted: one of them")
    if train.layer_decay is not None and not 0 < train.layer_decay <= 1:
        raise ConfigError(f"train.layer_decay: {train.layer_decay!r} is invalid; accepted: (0, 1] or null")
    if not 0 <= train.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing: {train.label_smoothing!r} is invalid; accepted: [0, 1)")
    clashes = sorted(set(config.model.timm_kwargs) & set(ModelConfig.ARCHITECTURE_FIELDS))
    if clashes:
        raise ConfigError(f"model.timm_kwargs.{clashes[0]}: set model.{clashes[0]} instead (it has its own key)")
    _positive("eval.batch_size", config.eval.batch_size)
    _positive("eval.every", config.eval.every, allow_zero=True)
    _positive("logging.log_every", config.logging.log_every)
    for tracker in config.logging.trackers:
        _choice("logging.trackers", tracker, TRACKERS)
    _positive("data.num_workers", config.data.num_workers, allow_zero=True)
    _positive("moe.aux_loss_weight", config.moe.aux_loss_weight, allow_zero=True)
    _choice("bsr.frozen_dtype", config.bsr.frozen_dtype, FROZEN_DTYPE_NAMES)
    cache = config.trunk_cache
    _choice("trunk_cache.dtype", cache.dtype, TRUNK_CACHE_DTYPES)
    _choice("trunk_cache.location", cache.location, TRUNK_CACHE_LOCATIONS)
    _positive("trunk_cache.max_gib", cache.max_gib, allow_zero=True)
    _positive("trunk_cache.views", cache.views, allow_zero=True)
    if config.lora.enabled:
        _positive("lora.rank", config.lora.rank)
        for name in config.lora.modules:
            _choice("lora.modules", name, list(ADAPTED_MODULES))
    if config.adapters.enabled:
        _positive("adapters.rank", config.adapters.rank)
        _positive("adapters.alpha", config.adapters.alpha)
        for name in config.adapters.modules:
            _choice("adapters.modules", name, list(ADAPTED_MODULES))
        if config.lora.enabled:
            raise ConfigError("adapters.enabled: true with lora.enabled: true; accepted: one of them (shared LoRA is "
                              "the baseline the task adapters are compared with)")
    try:
        check_keep_rate(config.token_drop.keep_rate)
        check_decision(config.token_drop.decision)
        check_dispatch(config.moe.dispatch, config.moe.capacity_factor)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def validate_against_model(config: RunConfig, depth: int) -> None:
    """Block indices, top-k, presets: checks that depend on the backbone's depth."""
    try:
        config.moe.spec().validate(depth)
        spec = config.token_drop.spec()
        if spec is not None:
            spec.validate(depth)
        config.bsr.plan().validate(depth)
        if config.lora.enabled and config.lora.blocks is not None:
            check_block_indices("lora.blocks", config.lora.blocks, depth)
        if config.adapters.enabled:
            blocks = config.adapters_blocks(depth)
            if not blocks:
                raise ValueError("adapters.blocks: no block (bsr trains none and adapters.blocks is null); accepted: "
                                 "a list of block indices")
            drop = config.token_drop.spec()
            if drop is not None and drop.decision == "shared" and 0 in blocks \
                    and {"qkv", "proj"} & set(config.adapters.modules):
                raise ValueError("adapters.blocks: an adapter in block 0's attention leaves no attention every task "
                                 "shares to rank tokens by (token_drop.decision: shared); accepted: adapters.blocks "
                                 "from 1 on, adapters.modules without qkv/proj, or token_drop.decision=per_task")
    except ValueError as error:
        raise ConfigError(str(error)) from None


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """The inverse of :func:`config_to_dict` (a run's saved ``config.json``), typed and checked by OmegaConf."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), values))


def save_config(config: RunConfig, path: str | os.PathLike, relative_paths: bool = False) -> None:
    """``relative_paths``: write ``PATH_KEYS`` relative to the file's folder (how a config file names them), so the
    file stays valid wherever the folder and what it points to move together."""
    layer = OmegaConf.structured(config)
    if relative_paths:
        folder = Path(path).resolve().parent
        for key in PATH_KEYS:
            value = OmegaConf.select(layer, key, default=None)
            if isinstance(value, str):
                OmegaConf.update(layer, key, _relative(folder, value))
            elif isinstance(value, ListConfig):
                OmegaConf.update(layer, key, [_relative(folder, item) if isinstance(item, str) else item
                                              for item in value])
    OmegaConf.save(layer, path)


def _relative(folder: Path, value: str) -> str:
    return os.path.relpath(value, folder) if Path(value).is_absolute() else value
