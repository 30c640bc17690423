"""The frozen-trunk cache: read-back equals recomputation, the bound holds, the loader's views repeat, and a cached
training run trains as an uncached one (exactly in fp32; hit or miss alike in bf16)."""

import pytest
import torch
from run_helpers import QUICKSTART, short_run_overrides
from tiny_models import distinct_experts, images, tiny_moevit
from torch.utils.flop_counter import FlopCounterMode

from moebsr.analysis.profiling import unfused_attention
from moebsr.config import ConfigError, load_config
from moebsr.data import build_task_loader
from moebsr.data.image_spec import ImageSpec
from moebsr.tasks import create_task
from moebsr.training.loop import train
from moebsr.training.trunk_cache import TrunkCache, TrunkCacheError, check_cacheable

TASKS = ["a", "b"]
BATCHES = [torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([4, 5, 6, 7, 8, 9]), torch.tensor([9, 0, 5, 2])]


def _model():
    """MoE with per-task gates at frozen block 1 (the task streams split inside the cached trunk), dropping at 0 and
    2 (the shared ranking is made in the trunk and used after it); blocks 2 and 3 train."""
    model = tiny_moevit(moe=dict(blocks=[1, 3], num_experts=4, top_k=2), bsr=dict(preset="last_k", last_k=2),
                        token_drop=dict(blocks=[0, 2], keep_rate=0.5))
    return distinct_experts(model).train()


def _cache(dtype="fp32", max_bytes=10 ** 9, folder=None):
    return TrunkCache(TASKS, num_keys=10, views=0, dtype=dtype, max_bytes=max_bytes, device=torch.device("cpu"),
                      folder=folder)


def test_cached_forward_and_gradients_equal_the_plain_model_in_fp32():
    model, data, cache = _model(), images(10), _cache()
    for batch in BATCHES:  # all misses, then half read back, then all read back
        plain = model(data[batch], TASKS)
        plain_grads = torch.autograd.grad(sum(o.square().sum() for o in plain.values()),
                                          list(model.trainable_parameters()))
        cached = cache.forward(model, model, data[batch], batch, view=0)
        cached_grads = torch.autograd.grad(sum(o.square().sum() for o in cached.values()),
                                           list(model.trainable_parameters()))
        for task in TASKS:
            assert torch.equal(plain[task], cached[task])
        for plain_grad, cached_grad in zip(plain_grads, cached_grads):
            assert torch.equal(plain_grad, cached_grad)
    assert cache.stats()["hits"] == 2 + 4 and cache.stats()["misses"] == 6 + 4


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_cache_reads_back_what_it_computes_and_stays_close_to_the_plain_model(dtype):
    model, data = _model(), images(10)
    cache = _cache(dtype)
    first = cache.forward(model, model, data[BATCHES[0]], BATCHES[0], view=0)  # computed, rounded, stored
    again = cache.forward(model, model, data[BATCHES[0]], BATCHES[0], view=0)  # read back
    plain = model(data[BATCHES[0]], TASKS)
    for task in TASKS:
        assert torch.equal(first[task], again[task])
        torch.testing.assert_close(first[task], plain[task], rtol=0, atol=2e-2)
        assert not torch.equal(first[task], plain[task])  # the rounding is real


def test_the_size_bound_holds_and_images_past_it_are_computed():
    model, data = _model(), images(10)
    probe = _cache()
    probe.forward(model, model, data[:1], torch.tensor([0]), view=0)
    per_image = probe.layout.bytes_per_image()
    cache = _cache(max_bytes=3 * per_image + 1)
    for batch in BATCHES:
        torch.testing.assert_close(cache.forward(model, model, data[batch], batch, view=0)["a"],
                                   model(data[batch], TASKS)["a"], rtol=0, atol=0)
    stats = cache.stats()
    assert stats["capacity"] == 3 and stats["images_stored"] == 3 and stats["bytes_stored"] == 3 * per_image
    assert stats["hits"] == 2  # images 0 and 2 (stored first) in the last batch; everything else computed


def test_disk_cache_writes_memory_mapped_files_and_reads_them_back(tmp_path):
    model, data = _model(), images(10)
    cache = _cache("bf16", folder=tmp_path / "cache")
    first = cache.forward(model, model, data[BATCHES[0]], BATCHES[0], view=0)
    assert (tmp_path / "cache" / "tokens.bin").stat().st_size == cache.capacity * cache.layout.bytes_per_image(
    ) - sum(cache.store[name].numel() * cache.store[name].element_size() for name in cache.store if name != "tokens")
    again = cache.forward(model, model, data[BATCHES[0]], BATCHES[0], view=0)
    assert torch.equal(first["a"], again["a"]) and cache.stats()["hits"] == 6


def test_a_cached_forward_skips_the_trunk_flops():
    model, data, cache = _model(), images(10), _cache()
    cache.forward(model, model, data[BATCHES[0]], BATCHES[0], view=0)

    def flops(run):
        with unfused_attention(model), FlopCounterMode(display=False) as counter:
            run()
        return counter.get_total_flops()
    plain = flops(lambda: model(data[BATCHES[0]], TASKS))
    cached = flops(lambda: cache.forward(model, model, data[BATCHES[0]], BATCHES[0], view=0))
    assert cached < 0.7 * plain


def test_nothing_to_cache_when_block_0_or_the_embeddings_train():
    for bsr in ("all", "paper"):  # paper at depth 4 trains block 0
        with pytest.raises(TrunkCacheError, match="nothing to cache"):
            check_cacheable(tiny_moevit(bsr=bsr))
    assert check_cacheable(tiny_moevit(bsr=dict(preset="last_k", last_k=2))) == 2


def test_loader_views_repeat_every_k_epochs_and_zero_views_turn_augmentation_off():
    task = create_task("digits")
    spec = ImageSpec(image_size=8, in_chans=1, mean=(0.5,), std=(0.5,))

    def epochs(views, count):
        loader = build_task_loader(task, "train", spec, batch_size=1438, train=True, augment_views=views)
        out = []
        for _ in range(count):
            batch = loader.next_batch()
            out.append((batch["view"], batch["images"][batch["indices"].argsort()]))
        return out
    two = epochs(2, 3)
    assert [view for view, _ in two] == [0, 1, 0]
    assert torch.equal(two[0][1], two[2][1]) and not torch.equal(two[0][1], two[1][1])
    none = epochs(0, 2)
    evaluation = build_task_loader(task, "train", spec, batch_size=1438, train=False)
    plain = evaluation.next_batch()["images"]
    assert torch.equal(none[0][1], plain) and torch.equal(none[1][1], plain)


CACHED_RUN = ["tasks=[digits]", "train.sampler=round_robin", "train.batch_size=64", "bsr.preset=last_k",
              "bsr.last_k=2", "logging.trackers=[none]", "train.checkpoint_every=0"]


def _cached_run(tmp_path, name, *extra):
    config = load_config(QUICKSTART, short_run_overrides(tmp_path / name, 25, CACHED_RUN + list(extra)))
    return train(config)


def _agree_to_float_noise(cached, other, task):
    """Identical until the first batch read back (step 23: epoch 0 has 22 batches); after it, an image's cached tokens
    are those of the batch that computed them, and the grouped expert dispatch rounds a row differently with other
    rows beside it (1e-7 here), so the runs agree to float noise (amplified by near-tied token rankings)."""
    cached_losses, other_losses = [r["loss"] for r in cached.losses], [r["loss"] for r in other.losses]
    assert cached_losses[:22] == other_losses[:22]
    assert max(abs(a - b) for a, b in zip(cached_losses, other_losses)) < 1e-2
    assert abs(cached.metrics[task]["top1"] - other.metrics[task]["top1"]) <= 0.02


def test_a_bf16_cached_run_trains_as_one_whose_cache_holds_nothing(tmp_path, capsys):
    """Tokens read back and tokens computed now are rounded to bf16 alike, so a run does not depend on what fitted."""
    cached = _cached_run(tmp_path, "cached", "trunk_cache.enabled=true")
    # epoch 0 stores its 22 x 64 images; the 3 batches of epoch 1 add the ones it had not drawn, read back the rest
    assert "trunk cache: 1,414 images stored (1.5 MiB bf16, memory, augmentation off); 12% of the images read back" \
        in capsys.readouterr().out
    empty = _cached_run(tmp_path, "empty", "trunk_cache.enabled=true", "trunk_cache.max_gib=0")
    assert "trunk cache: 0 images stored" in capsys.readouterr().out
    _agree_to_float_noise(cached, empty, "digits")


@pytest.fixture
def digits_unaugmented():
    """digits without augmentation, what an uncached run must train on to equal a cache of views 0."""
    from moebsr.tasks import BatchAugment, register_task, unregister_task
    from moebsr.tasks.builders import packaged_task

    @register_task("digits_unaugmented")
    def factory():
        return packaged_task("digits_unaugmented", "sklearn_digits", 10, batch_augment=BatchAugment())
    yield "digits_unaugmented"
    unregister_task("digits_unaugmented")


def test_an_fp32_cached_run_trains_as_the_uncached_run(tmp_path, digits_unaugmented):
    task = [f"tasks=[{digits_unaugmented}]"]
    cached = _cached_run(tmp_path, "cached", *task, "trunk_cache.enabled=true", "trunk_cache.dtype=fp32",
                         "trunk_cache.location=disk")
    assert not (tmp_path / "cached" / "trunk_cache").exists()  # the files lived while the run trained
    _agree_to_float_noise(cached, _cached_run(tmp_path, "plain", *task), digits_unaugmented)


def test_trunk_cache_keys_are_checked():
    with pytest.raises(ConfigError, match="trunk_cache.views=2: does nothing while trunk_cache.enabled is false"):
        load_config(QUICKSTART, ["trunk_cache.views=2"])
    with pytest.raises(ConfigError, match="trunk_cache.dtype: 'int8' is invalid; accepted: bf16, fp16, fp32"):
        load_config(QUICKSTART, ["trunk_cache.enabled=true", "trunk_cache.dtype=int8"])
    with pytest.raises(ConfigError, match="trunk_cache.location: 'cloud' is invalid; accepted: memory, disk"):
        load_config(QUICKSTART, ["trunk_cache.enabled=true", "trunk_cache.location=cloud"])
