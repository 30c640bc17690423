import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moebsr.config import ConfigError, RunConfig, load_config, save_config
from moebsr.training.build import check_config_against_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["quickstart", "quickstart_full", "pretrain", "paper_bsr", "paper_full",
                                  "paper_lastk", "paper_bsr_adamw", "paper_lean", "quickstart_lean"])
def test_shipped_configs_parse_and_fit_their_model(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert isinstance(config, RunConfig) and config.tasks
    check_config_against_model(config)


def test_paper_configs_differ_only_in_what_trains():
    bsr, full, lastk = (load_config(CONFIGS / f"paper_{n}.yaml") for n in ("bsr", "full", "lastk"))
    assert bsr.model == full.model == lastk.model
    # the same MoE; the paper preset adds its memory levers, which change no number (expert recomputation, and bf16
    # frozen weights under bf16 autocast); the baselines are plain
    assert dataclasses.replace(bsr.moe, recompute_experts=False) == full.moe == lastk.moe
    assert (bsr.moe.recompute_experts, bsr.bsr.frozen_dtype, bsr.train.mixed_precision) == (True, "bf16", "bf16")
    assert bsr.tasks == full.tasks == ["cifar10", "cifar100", "pets", "flowers102", "food101"]
    assert bsr.bsr.plan().resolve(12).trainable_blocks == (3, 7, 11)
    assert full.bsr.plan().resolve(12).trainable_blocks == tuple(range(12)) and not full.token_drop.enabled
    assert lastk.bsr.plan().resolve(12).trainable_blocks == (9, 10, 11)
    assert bsr.token_drop.enabled and bsr.token_drop.blocks == [3, 6, 9]
    for key in ("optimizer", "lr", "momentum", "weight_decay", "layer_decay", "warmup_steps", "grad_clip", "batch_size",
                "label_smoothing", "steps", "mixed_precision"):
        assert getattr(bsr.train, key) == getattr(full.train, key) == getattr(lastk.train, key), key


def test_the_lean_presets_train_the_last_3_blocks_where_the_moe_is():
    paper, lean, twin = (load_config(CONFIGS / name) for name in ("paper_bsr.yaml", "paper_lean.yaml",
                                                                   "quickstart_lean.yaml"))
    assert lean.model == paper.model and lean.tasks == paper.tasks and lean.train.optimizer == paper.train.optimizer
    assert lean.bsr.plan().resolve(12).trainable_blocks == tuple(lean.moe.blocks) == (9, 10, 11)
    assert twin.bsr.plan().resolve(6).trainable_blocks == tuple(twin.moe.blocks) == (3, 4, 5)
    for config in (lean, twin):
        assert config.token_drop.enabled and config.moe.recompute_experts and config.token_drop.keep_rate == 0.5


def test_paper_configs_follow_the_authors_moe_script():
    config = load_config(CONFIGS / "paper_bsr.yaml")
    train = config.train
    assert (train.optimizer, train.momentum, train.lr) == ("sgd", 0.9, 0.01)
    assert (train.weight_decay, train.layer_decay) == (0, None)
    assert (train.warmup_steps, train.grad_clip, train.batch_size, train.label_smoothing) == (500, 1.0, 128, 0.0)
    assert config.model.drop_path_rate == 0 and config.moe.aux_loss_weight == 0 and not config.moe.renormalize
    assert (config.moe.num_experts, config.moe.top_k, config.moe.blocks) == (16, 4, [3, 7, 11])
    assert (config.token_drop.keep_rate, config.token_drop.fuse) == (0.7, False)
    adamw = load_config(CONFIGS / "paper_bsr_adamw.yaml")
    assert (adamw.train.optimizer, adamw.train.layer_decay, adamw.token_drop.keep_rate) == ("adamw", 0.75, 0.5)


def test_overrides_are_typed_and_nested():
    config = load_config(CONFIGS / "quickstart.yaml", ["train.steps=7", "train.warmup_steps=1", "moe.blocks=[1,2]",
                                                       "token_drop.fuse=false", "data.task_options.digits.seed=3"])
    assert config.train.steps == 7 and config.moe.blocks == [1, 2] and config.token_drop.fuse is False
    assert config.data.task_options == {"digits": {"seed": 3}}


def test_model_timm_kwargs_reach_timm_and_unknown_or_doubled_keys_are_one_line():
    """class_token, global_pool, reg_tokens, qk_norm... were unreachable from a config (`unknown key
    'model.class_token'`)."""
    from moebsr.training.build import backbone_depth, model_from_config
    from moebsr.training.run_data import RunData
    config = load_config(CONFIGS / "quickstart.yaml", [
        "model.checkpoint=null", "model.timm_kwargs.class_token=false", "model.timm_kwargs.global_pool=avg",
        "model.timm_kwargs.reg_tokens=2", "model.timm_kwargs.qk_norm=true"])
    assert config.model.timm_kwargs == {"class_token": False, "global_pool": "avg", "reg_tokens": 2, "qk_norm": True}
    backbone = model_from_config(config, RunData.from_config(config, check_data=False).heads()).backbone
    assert backbone.cls_token is None and backbone.global_pool == "avg" and backbone.num_prefix_tokens == 2
    assert not isinstance(backbone.blocks[0].attn.q_norm, torch.nn.Identity)
    with pytest.raises(ConfigError, match=r"^model.timm_kwargs: unknown key 'class_tokens'; accepted: global_pool, "
                                          r"mlp_ratio, .*class_token"):
        backbone_depth(load_config(CONFIGS / "quickstart.yaml", ["model.timm_kwargs.class_tokens=false"]).model)
    with pytest.raises(ConfigError, match=r"^model.timm_kwargs.depth: set model.depth instead"):
        load_config(CONFIGS / "quickstart.yaml", ["model.timm_kwargs.depth=4"])


def test_a_learning_rate_schedule_that_cannot_act_is_refused_in_one_line():
    """The quickstart's 60 warm-up steps in a 50-step run (the README's own example, before) never left warm-up: the
    last learning rate was a fraction of train.lr and there was no decay, without a word."""
    with pytest.raises(ConfigError, match=r"^train.warmup_steps: 60 is not below train.steps=50, so the learning rate "
                                          r"would never leave warm-up; accepted: 0 <= train.warmup_steps < 50 "
                                          r"\(e.g. train.warmup_steps=2\)$"):
        load_config(CONFIGS / "quickstart.yaml", ["train.steps=50"])
    assert load_config(CONFIGS / "quickstart.yaml", ["train.steps=50", "train.warmup_steps=2"]).train.warmup_steps == 2
    assert load_config(CONFIGS / "quickstart.yaml", ["train.steps=1", "train.warmup_steps=0"]).train.steps == 1
    with pytest.raises(ConfigError, match=r"^train.min_lr: 0.01 is above train.lr=0.001, so the cosine would rise"):
        load_config(CONFIGS / "quickstart.yaml", ["train.min_lr=0.01"])


def test_mixed_precision_no_means_no_although_yaml_reads_it_as_false(tmp_path):
    """`no` is accelerate's own word (and what the loop suggests after non-finite losses); YAML 1.1 makes it false."""
    assert load_config(CONFIGS / "paper_bsr.yaml", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    (tmp_path / "fp32.yaml").write_text("tasks: [digits]\ntrain:\n  mixed_precision: no\n")
    assert load_config(tmp_path / "fp32.yaml").train.mixed_precision == "no"
    # any other string setting that YAML turned into a boolean is named as such
    with pytest.raises(ConfigError, match=r"^train.sampler: 'True' is invalid \(YAML read a yes/no/on/off/true/false "
                                          r"as a boolean\); accepted: round_robin"):
        load_config(CONFIGS / "quickstart.yaml", ["train.sampler=on"])


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", r"^override: unknown key 'train.stepz'; accepted here: output_dir, batch_size"),
    ("bogus=1", r"unknown key 'bogus'; accepted here: tasks, model, moe"),
    ("train.steps=many", r"train.steps: Value 'many' of type 'str' could not be converted to Integer; accepted: an "
                         r"integer$"),
    ("train.lr=fast", r"train.lr: Value 'fast' of type 'str' could not be converted to Float; accepted: a number$"),
    ("token_drop.fuse=maybe", r"token_drop.fuse: Value 'maybe' is not a valid bool \(type str\); accepted: true or "
                              r"false$"),
    ("train.warmup_steps=-1", r"train.warmup_steps: -1 is invalid; accepted: an integer >= 0$"),
    ("train.batch_size=-4", r"train.batch_size: -4 is invalid; accepted: an integer >= 1$"),
    ("train.sampler=random", r"train.sampler: 'random' is invalid; accepted: round_robin, proportional"),
    ("token_drop.keep_rate=0", r"token_drop.keep_rate: 0.0 is invalid; accepted: a number in \(0, 1\]"),
    ("token_drop.keep_rate=1.5", r"token_drop.keep_rate: 1.5 is invalid"),
    ("train.mixed_precision=fp8", r"train.mixed_precision: 'fp8' is invalid; accepted: no, bf16, fp16"),
    ("token_drop.decision=random", r"token_drop.decision: 'random' is invalid; accepted: shared, per_task"),
    ("tasks=[]", r"tasks: empty"),
    ("moe.dispatch=sparse", r"^moe.dispatch: 'sparse' is invalid; accepted: grouped, padded$"),
    ("moe.dispatch=padded", r"^moe.dispatch: 'padded' needs moe.capacity_factor \(the slots per expert\); accepted: "
                            r"a moe.capacity_factor > 0, or moe.dispatch=grouped$"),
    ("train.steps", r"expected key=value"),
    ("logging.trackers=[csv]", r"^logging.trackers: 'csv' is invalid; accepted: tensorboard, none$"),  # no such tracker
])
def test_bad_values_are_rejected_naming_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "quickstart.yaml", [override])


@pytest.mark.parametrize("override, message", [
    ("moe.top_k=9", r"moe.top_k: 9 is invalid; accepted: 1..moe.num_experts \(8\)"),
    ("moe.blocks=[2,6]", r"moe.blocks: block index 6 out of range; accepted: 0..5"),
    ("bsr.preset=most", r"bsr.preset: unknown preset 'most'"),
    ("bsr.trainable_blocks=[7]", r"bsr.trainable_blocks: block index 7 out of range"),
    ("model.name=resnet_nope", r"model.name: unknown timm model 'resnet_nope'"),
    ("model.name=resnet50", r"^model.name: 'resnet50' is not a ViT \(it is a timm 'resnet' model\); accepted: a timm "
                            r"ViT/DeiT \(models that build a timm VisionTransformer"),
    ("model.img_size=-3", r"^model: vit_tiny_patch16_224 cannot be built with"),
])
def test_model_dependent_values_are_rejected_before_building(override, message):
    config = load_config(CONFIGS / "quickstart.yaml", [override])
    with pytest.raises(ConfigError, match=message):
        check_config_against_model(config)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="--config: no file at"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("tasks: [a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_resolved_config_round_trips(tmp_path):
    config = load_config(CONFIGS / "quickstart.yaml", ["train.steps=9", "train.warmup_steps=3"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("config_name, override, message", [
    ("quickstart_full.yaml", "token_drop.blocks=[2,4]", r"^token_drop.blocks=\[2,4\]: does nothing while "
                                                        r"token_drop.enabled is false; accepted: add "
                                                        r"token_drop.enabled=true, or leave token_drop.blocks out$"),
    ("quickstart_full.yaml", "token_drop.keep_rate=0.5", r"token_drop.keep_rate=0.5: does nothing while"),
    ("quickstart.yaml", "lora.rank=4", r"^lora.rank=4: does nothing while lora.enabled is false"),
    ("quickstart.yaml", "bsr.last_k=2", r"^bsr.last_k=2: does nothing with bsr.preset=paper; accepted: add "
                                        r"bsr.preset=last_k"),
])
def test_an_override_that_would_do_nothing_names_the_switch(config_name, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / config_name, [override])


def test_overrides_with_their_switch_take_effect():
    dropping = load_config(CONFIGS / "quickstart_full.yaml", ["token_drop.enabled=true", "token_drop.blocks=[2,4]"])
    assert dropping.token_drop.spec().blocks == [2, 4]
    kept_off = load_config(CONFIGS / "quickstart_full.yaml", ["token_drop.keep_rate=0.3", "token_drop.enabled=false"])
    assert kept_off.token_drop.spec() is None and kept_off.token_drop.keep_rate == 0.3  # explicit: kept for eval
    assert load_config(CONFIGS / "quickstart.yaml", ["bsr.preset=last_k", "bsr.last_k=2"]).bsr.plan().resolve(
        6).trainable_blocks == (4, 5)


def test_moe_dispatch_decides_whether_a_forward_reads_the_device_and_padded_is_the_torch_backends():
    import torch
    from fake_cuda import fake_cuda

    from moebsr.training.build import model_from_config
    from moebsr.training.recipe import describe_recipe
    reads = {}
    for dispatch in ("grouped", "padded"):
        config = load_config(CONFIGS / "quickstart.yaml", [
            "model.checkpoint=null", "model.depth=4", "model.embed_dim=32", "model.num_heads=2",
            "moe.capacity_factor=1.25", f"moe.dispatch={dispatch}"])
        model = model_from_config(config, {t: 2 for t in config.tasks}).train()
        with fake_cuda() as cuda:
            model.to("cuda")(torch.randn(2, 3, 28, 28).to("cuda"), ["digits"])
        reads[dispatch] = dict(cuda.host_reads)
    assert reads == {"grouped": {"tolist": 3}, "padded": {}}  # one read per MoE layer, or none
    assert "8 experts, top-2, router `task`, capacity factor 1.25, padded dispatch\n" in describe_recipe(config, model)
    tutel = load_config(CONFIGS / "quickstart.yaml", ["moe.capacity_factor=1.25", "moe.dispatch=padded",
                                                      "moe.backend=tutel"])
    with pytest.raises(ConfigError, match=r"^moe.dispatch: 'padded' is the torch backend's \(moe.backend is "
                                          r"'tutel', which always pads\); accepted: moe.backend=torch, or "
                                          r"moe.dispatch=grouped$"):
        check_config_against_model(tutel)


HEAVY_MODULES = ("torch", "timm", "accelerate", "peft", "datasets")


@pytest.mark.parametrize("run_entry", ["runpy.run_module('moebsr', run_name='__main__')",
                                       f"runpy.run_path({str(CONFIGS.parent / 'launch' / 'multitask.py')!r}, "
                                       "run_name='__main__')"], ids=["moebsr train", "launch/multitask.py"])
def test_a_bad_key_is_refused_in_one_line_before_torch_is_imported(run_entry):
    """A typo must not wait for the heavy stack (seconds, tens of seconds on a loaded machine): the config is parsed
    and checked with omegaconf alone, and the exit path imports nothing either."""
    arguments = ["--config", str(CONFIGS / "quickstart.yaml"), "train.stepz=3"]
    if "moebsr'" in run_entry:
        arguments.insert(0, "train")
    probe = ("import atexit, os, runpy, sys\n"
             f"atexit.register(lambda: os.write(2, ('heavy=' + ','.join(m for m in {HEAVY_MODULES!r} "
             "if m in sys.modules) + '\\n').encode()))\n"
             f"sys.argv = ['entry', *{arguments!r}]\n{run_entry}\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env=_subprocess_env())
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert lines[0].startswith("error: override: unknown key 'train.stepz'") and lines[1:] == ["heavy="], lines


def _subprocess_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(CONFIGS.parent), OMP_NUM_THREADS="1")


def test_parsing_and_checking_a_config_imports_no_torch():
    quickstart = str(CONFIGS / "quickstart.yaml")
    probe = ("import sys\nfrom moebsr.config import ConfigError, load_config\n"
             f"load_config({quickstart!r}, ['lora.enabled=true', 'bsr.frozen_dtype=bf16'])\n"
             "try:\n"
             f"    load_config({quickstart!r}, ['adapters.enabled=true', 'adapters.modules=[qkv,bogus]'])\n"
             "except ConfigError as error:\n    print(error)\n"
             f"print([m for m in {HEAVY_MODULES!r} if m in sys.modules])\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env=_subprocess_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["adapters.modules: 'bogus' is invalid; accepted: qkv, proj, fc1, fc2", "[]"]
