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
from .model.spec import (
    ADAPTED_MODULES,
    FROZEN_DTYPE_NAMES,
    MoESpec,
    TokenDropSpec,
    check_block_indices,
    check_decision,
    check_dispatch,
    check_keep_rate,
)

OPTIMIZERS = ("adamw", "sgd")
SAMPLERS = ("round_robin", "proportional", "temperature", "joint")
MIXED_PRECISION = ("no", "bf16", "fp16")
TRACKERS = ("tensorboard", "none")


class ConfigError(ValueError):
    """A bad config value; the message is one line naming the key, the value and what is accepted."""


@dataclass
class ModelConfig:
    """The backbone: which timm ViT to build, its weights, and any architecture field that differs from timm's."""

    name: str = "vit_tiny_patch16_224"
    """timm model name of the backbone (``vit_*``, ``deit_*``, ``eva02_*``, ...); the families that work are on the
    compatibility page."""
    pretrained: bool = False
    """Load timm's pretrained weights for ``name`` (needs the network or a filled Hugging Face cache)."""
    checkpoint: Optional[str] = None
    """Local backbone weights (a timm-loadable safetensors file), used in place of ``pretrained``; a relative path
    in a config file is relative to that file."""
    pretrain_config: Optional[str] = None
    """A config that produces ``checkpoint`` when it is missing: the first run trains it once (one process only);
    a relative path in a config file is relative to that file."""
    img_size: Optional[int] = None
    """Input image size in pixels; ``null`` keeps the timm model's (position embeddings are resampled)."""
    patch_size: Optional[int] = None
    """Patch size in pixels; ``null`` keeps the timm model's."""
    in_chans: Optional[int] = None
    """Input channels; ``null`` keeps the timm model's (3)."""
    depth: Optional[int] = None
    """Number of transformer blocks; ``null`` keeps the timm model's. Block indices left ``null`` elsewhere scale
    with it."""
    embed_dim: Optional[int] = None
    """Token width; ``null`` keeps the timm model's."""
    num_heads: Optional[int] = None
    """Attention heads per block; ``null`` keeps the timm model's."""
    drop_path_rate: float = 0.0
    """Stochastic depth rate; it acts only in trainable blocks (frozen blocks run in eval mode)."""
    # checked against its signature before anything is built
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)
    """Any other argument of timm's ``VisionTransformer`` (or ``Eva``), e.g. ``{class_token: false, global_pool:
    avg, reg_tokens: 4, qk_norm: true, dynamic_img_size: true}``; an unknown one is refused naming the accepted
    ones."""

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
    """Weight of the MoE balancing loss (M³ViT's cv² of importance + load, summed over MoE layers) in the training
    loss; >= 0, 0 turns it off (the paper's BSR script trains without it)."""

    def spec(self) -> MoESpec:
        fields = {f.name for f in dataclasses.fields(MoESpec)}
        return MoESpec(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})


@dataclass
class BSRConfig:
    """Block selective reprogramming: which blocks and sub-layers train (the config form of :class:`BSRPlan`)."""

    preset: str = "paper"
    """``paper``: blocks (3, 7, 11) scaled to depth; ``last_k``: the last ``bsr.last_k`` blocks; ``all``: full
    fine-tuning (embeddings too); ``none``: heads only; ``custom``: ``bsr.trainable_blocks``."""
    trainable_blocks: Optional[List[int]] = None
    """Explicit block indices that train; when set they override the preset's choice (required with ``custom``)."""
    last_k: int = 3
    """How many final blocks train with ``preset: last_k``, 1..depth; set with another preset it is refused."""
    sublayers: List[str] = field(default_factory=lambda: ["attn", "mlp", "router", "norm"])
    """Which parts of a trainable block train: any of ``attn``, ``mlp`` (the experts or the dense MLP), ``router``
    (the MoE gates), ``norm``."""
    train_final_norm: Optional[bool] = None
    """Train the final norm; ``null``: yes, except with ``preset: none``."""
    train_embeddings: Optional[bool] = None
    """Train the patch and position embeddings and the class token; ``null``: only with ``preset: all``."""
    block_sublayers: Optional[Dict[int, List[str]]] = None
    """Per-block choice, block -> the sub-layers it trains (e.g. ``{3: [attn, norm]}``; what ``moebsr plan``
    writes): these blocks train beside the preset's, and only the sub-layers named for them."""
    frozen_dtype: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16``: the dtype the matmul weights of frozen layers are stored in (biases, norms
    and routers stay fp32; see ``model/precision.py``); under bf16 autocast ``bf16`` changes no number."""

    def plan(self) -> BSRPlan:
        fields = {f.name for f in dataclasses.fields(BSRPlan)}
        return BSRPlan(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})


@dataclass
class TokenDropConfig(TokenDropSpec):
    """:class:`TokenDropSpec` plus a switch: configs keep their dropping settings while it is off."""

    enabled: bool = False
    """Drop tokens in training and evaluation. While false the other ``token_drop`` keys of a config file are kept
    (``moebsr eval --keep-rate`` uses them), and an override of one of them is refused as doing nothing."""

    def spec(self) -> Optional[TokenDropSpec]:
        return TokenDropSpec(self.blocks, self.keep_rate, self.fuse, self.decision) if self.enabled else None


@dataclass
class LoRAConfig:
    """PEFT LoRA adapters, the parameter-efficient baseline; usually with ``bsr.preset: none``."""

    enabled: bool = False
    """Inject shared LoRA adapters (one for all tasks); the other ``lora`` keys act only while true, and it cannot
    be combined with ``adapters.enabled``."""
    blocks: Optional[List[int]] = None
    """Blocks that take LoRA; ``null``: the paper's blocks (3, 7, 11) scaled to depth."""
    modules: List[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    """Linear layers adapted: any of ``qkv``, ``proj`` (attention), ``fc1``, ``fc2`` (dense MLPs only: MoE experts
    take no LoRA)."""
    rank: int = 8
    """LoRA rank r, >= 1."""
    alpha: float = 16.0
    """LoRA scaling alpha (the delta is scaled by alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""


TRUNK_CACHE_DTYPES = ("bf16", "fp16", "fp32")
TRUNK_CACHE_LOCATIONS = ("memory", "disk")


@dataclass
class TrunkCacheConfig:
    """Keep the frozen trunk's output per image (the blocks before the first trainable one compute the same thing
    every epoch), so later epochs skip it; see :mod:`moebsr.training.trunk_cache`."""

    enabled: bool = False
    """Cache the output of the frozen blocks before the first trainable one, per image; the other ``trunk_cache``
    keys act only while true."""
    dtype: str = "bf16"
    """``bf16``, ``fp16`` or ``fp32``: what the trunk's tokens are stored in (and, read back or computed now, rounded
    to)."""
    max_gib: float = 4.0
    """Bound of the cache per process in GiB, >= 0; images past it are computed every time."""
    location: str = "memory"
    """``memory``: on the training device; ``disk``: memory-mapped files under ``<output_dir>/trunk_cache``, removed
    at the end of the run."""
    views: int = 0
    """0: training augmentation off while cached; K >= 1: K fixed augmented views per image (epoch e shows view
    e mod K)."""


@dataclass
class AdaptersConfig:
    """Per-task LoRA adapters: each task trains its own low-rank delta on the shared (BSR-trained) weights."""

    enabled: bool = False
    """Give every task its own LoRA delta on top of the shared weights; the other ``adapters`` keys act only while
    true, and it cannot be combined with ``lora.enabled``."""
    blocks: Optional[List[int]] = None
    """Blocks whose linear layers take task adapters; ``null``: the BSR plan's trainable blocks."""
    modules: List[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    """Linear layers adapted: any of ``qkv``, ``proj``, ``fc1``, ``fc2`` (``fc1``/``fc2`` only where the block's MLP
    is dense)."""
    rank: int = 4
    """Rank of each task's delta ``B_t A_t``, >= 1 (``B_t`` starts at zero)."""
    alpha: float = 8.0
    """Scaling alpha of each task's delta (scaled by alpha / rank), > 0."""


@dataclass
class DataConfig:
    """Where tasks come from and how their data loads."""

    task_dirs: List[str] = field(default_factory=list)
    """Extra folders of task files, imported beside ``tasks/`` and ``$MOEBSR_TASK_DIRS``; relative paths in a config
    file are relative to that file."""
    task_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    """Per-task factory options, task -> {option: value}, e.g. ``{imagefolder: {data_dir: ..., test_fraction: 0.2}}``
    or ``{mnist: {validation_fraction: 0.15}}``."""
    num_workers: int = 0
    """DataLoader worker processes for per-image datasets (hub datasets, image folders), >= 0; in-memory tensor
    datasets do not use them."""


@dataclass
class TrainConfig:
    """The training loop: output folder, optimisation, schedule, sampling, checkpoints and resume."""

    output_dir: str = "runs/default"
    """The run folder (config, checkpoints, logs, export), relative to the working directory; one run per folder."""
    batch_size: int = 64
    """Images per step and per process (P processes see batches of ``batch_size * P``), >= 1."""
    lr: float = 1e-3
    """Peak learning rate, after warm-up, > 0."""
    min_lr: float = 0.0
    """Learning rate the cosine ends at, 0 <= min_lr <= lr."""
    weight_decay: float = 0.05
    """Weight decay, >= 0; biases, norms, the class token and the position embedding are spared."""
    layer_decay: Optional[float] = None
    """Layer-wise learning-rate decay d in (0, 1]: group g trains at ``lr * d ** (depth + 1 - g)`` (timm's layer
    groups); ``null``: off."""
    optimizer: str = "adamw"
    """``adamw`` or ``sgd``."""
    momentum: float = 0.9
    """SGD momentum (used with ``optimizer: sgd`` only)."""
    steps: int = 100
    """Optimizer steps of the run, >= 1; the schedule is laid over them."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine, 0 <= warmup_steps < steps."""
    grad_clip: Optional[float] = 1.0
    """Clip the global gradient norm to this, > 0; ``null``: no clipping."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step, >= 1 (``moebsr plan --accumulate`` sets it)."""
    mixed_precision: str = "no"
    """Autocast precision: ``no``, ``bf16`` or ``fp16`` (fp16 is refused with experts sharded by tutel)."""
    sampler: str = "round_robin"
    """Which task(s) a step trains: ``round_robin``, ``proportional`` (p ~ n_i), ``temperature`` (p ~ n_i^(1/T)), or
    ``joint`` (tasks that label the same images train on one batch through one shared trunk)."""
    temperature: float = 2.0
    """T of the ``temperature`` sampler, > 0."""
    label_smoothing: float = 0.0
    """Label smoothing of every task's cross-entropy, in [0, 1) (a task's own ``label_smoothing`` option wins)."""
    seed: int = 0
    """Seed of the initialisation, the data order and augmentation."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps, >= 0; 0: only at the end (and on a stop signal)."""
    keep_checkpoints: int = 2
    """How many newest checkpoints are kept, >= 1; older ones are removed once a newer one is complete."""
    resume: Optional[str] = None
    """A checkpoint folder, or ``latest`` (the newest in ``output_dir``); changes to the schedule's keys are
    refused."""
    overwrite: bool = False
    """Clear another run's outputs from ``output_dir`` first (else such a folder is refused); not with ``resume``."""
    max_bad_steps: int = 5
    """Consecutive non-finite losses (each step skipped) before the run aborts, >= 1."""


@dataclass
class EvalConfig:
    """Evaluation during and at the end of training."""

    split: str = "test"
    """The split evaluated: ``test`` (a task built with ``validation_fraction`` evaluates its held-out share here)
    or ``train``."""
    every: int = 0
    """Evaluate every N steps, >= 0; 0: only at the end."""
    batch_size: int = 256
    """Images per evaluation batch, >= 1."""
    max_examples: Optional[int] = None
    """Evaluate only the first N examples of each task's split; ``null``: all of them."""


@dataclass
class LoggingConfig:
    """What the run reports while it trains."""

    log_every: int = 10
    """Write the losses, learning rate and images/s to the trackers every N steps, >= 1 (``train_log.jsonl`` gets
    every step)."""
    trackers: List[str] = field(default_factory=lambda: ["tensorboard"])
    """Accelerate trackers: ``tensorboard`` (event files under ``<output_dir>/moebsr``; the ``[tensorboard]`` extra) or
    ``none``; any other name is refused when the config is read."""
    progress: bool = True
    """Show a tqdm progress bar (on the local main process)."""


@dataclass
class RunConfig:
    """One experiment: the tasks and every section below; one YAML file in ``configs/`` plus overrides."""

    tasks: List[str] = field(default_factory=list)
    """Registered task names to train together (``moebsr tasks`` lists them); at least one, no duplicates."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Where the dense MLPs become mixtures of experts, and how they route."""
    bsr: BSRConfig = field(default_factory=BSRConfig)
    """Which blocks and sub-layers train."""
    token_drop: TokenDropConfig = field(default_factory=TokenDropConfig)
    """Attention-based token dropping."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Shared LoRA adapters, the parameter-efficient baseline."""
    trunk_cache: TrunkCacheConfig = field(default_factory=TrunkCacheConfig)
    """The frozen-trunk cache."""
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    """Per-task LoRA adapters."""
    data: DataConfig = field(default_factory=DataConfig)
    """Task discovery and data loading."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging and progress."""

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


def _validate_train(train: TrainConfig) -> None:
    """The ``train`` section's own checks: choices, ranges, and the pairs of keys that contradict each other."""
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


def validate_config(config: RunConfig) -> None:
    """Checks that need no model or data. Model-shape checks run in :func:`validate_against_model`."""
    if not config.tasks:
        raise ConfigError("tasks: empty; accepted: a list of task names (see `moebsr tasks`)")
    if len(set(config.tasks)) != len(config.tasks):
        raise ConfigError(f"tasks: duplicate names in {config.tasks}")
    _validate_train(config.train)
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
