"""The probe computes on the device of the extraction: heads, kNN, statistics, fused and online probes.

There is no GPU here. The ``meta`` device stands in for one where values are not needed, under
``device_harness.SameDevice`` (as strict as CUDA about mixing devices), so a head trained on ``meta`` from CPU-read
blocks and CPU labels proves that both were moved. Values are checked on the CPU, with fp16/bf16 features.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_unet
from device_harness import META, DtypeRecorder, SameDevice

from ddae_diffusers import DDAEBackbone
from ddae_diffusers.probing.cache import View
from ddae_diffusers.probing.engine import Prepared, ProbeConfig, _fit_heads, _scores
from ddae_diffusers.probing.fused import MLPHead, train_mlp_heads
from ddae_diffusers.probing.heads import (
    PAPER_RECIPE,
    HeadBank,
    LinearHead,
    ProbeRecipe,
    head_accuracies,
    linear_probe_accuracy,
    single_thread,
    train_heads,
)
from ddae_diffusers.probing.knn import knn_accuracies, knn_accuracy, knn_predict, knn_predictions
from ddae_diffusers.probing.online import sharded_features, train_online
from ddae_diffusers.probing.table import FeatureTable, column_stats, compute_device, stats_dtype

CLASSES = 4


def blobs(num: int, dims=(6, 10), seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({"a": (num, 6), "b": (num, 10)}, labels (num,))``: noisy class blobs, far from separable by chance."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (num,), generator=g)
    features = {}
    for name, dim in zip("ab", dims, strict=True):
        centres = torch.randn(CLASSES, dim, generator=g) * 1.5
        features[name] = centres[labels] + torch.randn(num, dim, generator=g) + 5
    return features, labels


def disk_table(features: dict[str, torch.Tensor]) -> FeatureTable:
    """A table read as the feature cache reads: float16 rows of numpy arrays, returned as CPU tensors."""
    arrays = {key: value.numpy().astype(np.float16) for key, value in features.items()}

    def reader(rows: np.ndarray, keys: list) -> dict:
        return {key: torch.from_numpy(arrays[key][rows]) for key in keys}

    num_rows = len(next(iter(arrays.values())))
    return FeatureTable({key: value.shape[1] for key, value in arrays.items()}, num_rows, reader)


# ------------------------------------------------------------------ tables
def test_tables_know_their_device_and_views_keep_it():
    features, _ = blobs(20)
    on_meta = FeatureTable.from_tensors({key: value.to(META) for key, value in features.items()})
    assert on_meta.device == META
    for view in (on_meta.select(["a"]), on_meta.subset([3, 1]), on_meta.fuse({"ab": ["a", "b"]}),
                 FeatureTable.concat_rows([on_meta.subset([0]), on_meta.subset([1])])):  # fmt: skip
        assert view.device == META
    assert on_meta.read([4, 2])["b"].shape == (2, 10) and on_meta.read([4, 2])["b"].device == META
    cached = disk_table(features)
    assert cached.device.type == "cpu" and cached.read([0])["a"].dtype == torch.float16
    mixed = FeatureTable.from_tensors({"a": features["a"], "b": features["b"].to(META)})
    assert mixed.device == META  # the first column that is not on the CPU
    assert compute_device(None, cached, on_meta) == META and compute_device("cpu", on_meta).type == "cpu"
    assert compute_device(None, cached).type == "cpu"


# ------------------------------------------------------------------ linear heads
def test_head_bank_lives_on_its_device_and_refuses_inputs_from_another():
    bank = HeadBank({"a": 6, "b": 6, "c": 10}, CLASSES, [1e-3, 1e-2], device="meta")
    assert bank.device == META and all(p.device == META for p in bank.parameters())
    optimizer, schedule = bank.optimizer(10)
    inputs = {"a": torch.randn(5, 6), "b": torch.randn(5, 6), "c": torch.randn(5, 10)}
    labels = torch.randint(0, CLASSES, (5,))
    with pytest.raises(RuntimeError, match="mixes devices"), SameDevice():  # a missed move fails, as on CUDA
        bank.loss(bank.stack(inputs), labels.to(META))
    with SameDevice() as strict:
        loss = bank.loss(bank.stack({key: value.to(META) for key, value in inputs.items()}), labels.to(META))
        loss.backward()
        optimizer.step()
        schedule.step()
    assert strict.ops["meta"] > 0
    assert loss.device == META and bank.head("c", 1, None).weight.shape == (CLASSES, 10)
    assert bank.head("c", 1, None).weight.device == META


@pytest.mark.parametrize("normalization", ["standardize", "none"])
def test_heads_train_on_the_chosen_device_from_cpu_blocks_and_labels(normalization):
    features, labels = blobs(100)
    recipe = ProbeRecipe(lrs=(1e-2,), epochs=2, batch_size=32, normalization=normalization)
    with SameDevice() as strict:
        fits = train_heads(disk_table(features), labels, CLASSES, recipe, device="meta")
    assert strict.ops["meta"] > strict.ops.get("cpu", 0)  # the CPU only reads blocks and draws the mini-batches
    for key, fit in fits.items():
        assert fit.head.weight.device == META and fit.head.weight.shape == (CLASSES, features[key].shape[1])
        if normalization == "standardize":
            assert fit.head.mean.device == META and fit.head.mean.dtype == torch.float32
    # the default device is the features': in-memory tensors on the stand-in with labels on the CPU
    on_meta = {key: value.to(META, torch.bfloat16) for key, value in features.items()}
    with SameDevice():
        fits = train_heads(on_meta, labels, CLASSES, recipe)
    assert all(fit.head.bias.device == META for fit in fits.values())


def test_mlp_heads_train_on_the_chosen_device_until_scored():
    features, labels = blobs(60)
    table = disk_table(features).fuse({"ab": ["a", "b"]})
    recipe = ProbeRecipe(lrs=(1e-2,), epochs=1, batch_size=16)
    # training runs on the stand-in (a CPU run would finish); choosing on validation needs values, and stops there
    with pytest.raises(NotImplementedError, match="meta"), SameDevice():
        train_mlp_heads(table.subset(range(40)), labels[:40], CLASSES, recipe, table.subset(range(40, 60)),
                        labels[40:], hidden=8, device="meta")  # fmt: skip


def test_engine_trains_heads_on_the_extraction_device(tmp_path):
    features, labels = blobs(50)
    backbone = DDAEBackbone(make_tiny_unet().to(META))  # the extraction device: the stand-in
    config = ProbeConfig(model="tiny", dataset="blobs", output_dir=str(tmp_path))
    prep = Prepared(
        config=config, backbone=backbone, train=None, eval=None, image_column="img", label_column="label",
        train_labels=labels, eval_labels=labels, num_labels=CLASSES, id2label={}, layers=[], timesteps=[],
        resolution=16, fit_rows=list(range(40)), val_rows=list(range(40, 50)),
    )  # fmt: skip
    # the cached views are CPU tables; the heads train on the backbone's device, and validation stops at its values
    with pytest.raises(NotImplementedError, match="meta"), SameDevice():
        _fit_heads(prep, [disk_table(features)], ProbeRecipe(lrs=(1e-2,), epochs=1, batch_size=16))
    # scores: CPU heads and tables, scored on the device they are given (on the CPU: the default's numbers)
    table, fits = disk_table(features), train_heads(disk_table(features), labels, CLASSES, PAPER_RECIPE)
    (on_cpu, correct_cpu), (default, correct) = (_scores(fits, table, labels, table, labels, device="cpu"),
                                                  _scores(fits, table, labels, table, labels))  # fmt: skip
    assert on_cpu == default
    for key in correct:
        assert all(torch.equal(correct_cpu[key][probe], correct[key][probe]) for probe in ("linear", "knn"))
    with pytest.raises(NotImplementedError, match="meta"), SameDevice():
        _scores(fits, table, labels, table, labels, device="meta")


def test_single_thread_only_on_the_cpu():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_thread("meta"):
            assert torch.get_num_threads() == 2
        with single_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        with single_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_heads_move_to_a_device():
    head = LinearHead(torch.randn(CLASSES, 6), torch.randn(CLASSES), torch.randn(6), torch.rand(6))
    moved = head.to("meta")
    assert all(t.device == META for t in (moved.weight, moved.bias, moved.mean, moved.var))
    assert head.to("cpu") is head and head.weight.device.type == "cpu"
    mlp = MLPHead(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, CLASSES)),
                  torch.zeros(6), torch.ones(6)).to("meta")  # fmt: skip
    assert mlp.mean.device == META and all(p.device == META for p in mlp.net.parameters())
    assert mlp.logits(torch.randn(3, 6, device=META)).shape == (3, CLASSES)


# ------------------------------------------------------------------ kNN
def test_knn_computes_on_the_chosen_device_from_cpu_tables():
    features, labels = blobs(50)
    bank, queries = disk_table(features).subset(range(30)), disk_table(features).subset(range(30, 50))
    with SameDevice():
        blocks = list(knn_predictions(bank, labels[:30], queries, CLASSES, k=5, chunk_size=7, device="meta"))
    assert [len(rows) for rows, _ in blocks] == [7, 7, 6]
    for rows, predicted in blocks:
        assert set(predicted) == {"a", "b"}
        assert all(p.device == META and p.shape == (len(rows),) for p in predicted.values())
    # in-memory features on the stand-in: that is the default device, labels may stay on the CPU
    with SameDevice():
        predicted = knn_predict(features["a"][:30].to(META), labels[:30], features["a"][30:].half().to(META), CLASSES)
    assert predicted.device == META and predicted.shape == (20,)


# ------------------------------------------------------------------ statistics without float64
def test_column_stats_without_float64_match_the_float64_path():
    x = torch.randn(5000, 7, dtype=torch.float64) * 3 + 1000  # a large mean: the pairwise merge must hold
    table = FeatureTable.from_tensors({"x": x.float()})
    mean64, var64 = column_stats(table, chunk_size=999)["x"]
    assert stats_dtype("cpu") == stats_dtype("cuda:0") == torch.float64
    assert stats_dtype("mps") == stats_dtype(META) == torch.float32
    recorder = DtypeRecorder()
    with recorder:
        mean32, var32 = column_stats(table, chunk_size=999, dtype=torch.float32)["x"]
    assert torch.float64 not in recorder.dtypes
    assert mean32.dtype == var32.dtype == torch.float32
    torch.testing.assert_close(mean32, mean64, rtol=1e-6, atol=0)
    torch.testing.assert_close(var32, var64, rtol=1e-4, atol=0)
    torch.testing.assert_close(var32, x.var(0, unbiased=False).float(), rtol=1e-4, atol=0)
    # a device without float64 (the stand-in counts as one) selects that path from fp16 blocks read on the CPU
    cached, recorder = disk_table({"y": x[:100].float()}), DtypeRecorder()
    with recorder, SameDevice():
        stats = column_stats(cached, chunk_size=33, device="meta")["y"]
    assert torch.float64 not in recorder.dtypes
    assert all(s.device == META and s.dtype == torch.float32 and s.shape == (7,) for s in stats)
    with pytest.raises(ValueError, match="float dtype"):
        column_stats(table, dtype=torch.int64)


# ------------------------------------------------------------------ values in fp16/bf16
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_score_as_float32(dtype):
    features, labels = blobs(400, seed=1)
    fit, val, test = slice(0, 250), slice(250, 300), slice(300, 400)
    recipe = ProbeRecipe(lrs=(1e-3, 1e-2), epochs=4, batch_size=64)
    scores = {}
    for name, cast in {"fp32": torch.float32, "half": dtype}.items():
        x = {key: value.to(cast) for key, value in features.items()}
        part = {key: {k: v[s] for k, v in x.items()} for key, s in {"fit": fit, "val": val, "test": test}.items()}
        fits = train_heads(part["fit"], labels[fit], CLASSES, recipe, part["val"], labels[val], device="cpu")
        linear = head_accuracies({k: [f.head] for k, f in fits.items()}, part["test"], labels[test], device="cpu")
        knn = knn_accuracies(part["fit"], labels[fit], part["test"], labels[test], k=10, device="cpu")
        mlp = train_mlp_heads(FeatureTable.from_tensors(part["fit"]).fuse({"ab": ["a", "b"]}), labels[fit], CLASSES,
                              recipe, FeatureTable.from_tensors(part["val"]).fuse({"ab": ["a", "b"]}), labels[val],
                              hidden=16, device="cpu")  # fmt: skip
        probe = linear_probe_accuracy(x["b"][fit], labels[fit], x["b"][test], labels[test], epochs=4, device="cpu")
        knn_one = knn_accuracy(x["a"][fit], labels[fit], x["a"][test], labels[test], k=10, device="cpu")
        scores[name] = [linear["a"][0], linear["b"][0], knn["a"], knn["b"], mlp["ab"].val_acc, probe, knn_one]
    assert 0.5 < min(scores["fp32"])  # the heads learned something (chance is 0.25)
    np.testing.assert_allclose(scores["half"], scores["fp32"], atol=0.04)


def test_explicit_cpu_is_the_default_and_bit_identical():
    features, labels = blobs(120)
    recipe = ProbeRecipe(lrs=(1e-3, 1e-2), epochs=2, batch_size=32)
    table = disk_table(features)
    fit, val = table.subset(range(100)), table.subset(range(100, 120))
    default = train_heads(fit, labels[:100], CLASSES, recipe, val, labels[100:])
    explicit = train_heads(fit, labels[:100], CLASSES, recipe, val, labels[100:], device=torch.device("cpu"))
    for key in default:
        assert torch.equal(default[key].head.weight, explicit[key].head.weight)
        assert default[key].val_accs == explicit[key].val_accs


# ------------------------------------------------------------------ online protocol
@pytest.fixture(scope="module")
def tiny_backbone() -> DDAEBackbone:
    return DDAEBackbone(make_tiny_unet())


def test_online_features_and_heads_follow_the_device(tiny_backbone, cifar_small):
    data = cifar_small.select(range(24))
    layer, level = "up_blocks.1.resnets.1", 10
    common = dict(layers=[layer], timesteps=[level], resolution=16, seed=0, dtype=None)
    on_meta = sharded_features(tiny_backbone, data, "img", [0, 3], View(2, 0, True), device="meta", **common)
    assert on_meta[layer, level].device == META and on_meta[layer, level].shape[0] == 2

    labels = torch.as_tensor(data["label"])
    args = (tiny_backbone, data, "img", labels, list(range(16)), list(range(16, 24)), [layer], [level], 16, 10)
    recipe = ProbeRecipe(lrs=(1e-3,), epochs=1, batch_size=8, normalization="none")
    default = train_online(*args, recipe=recipe, progress=False)
    explicit = train_online(*args, recipe=recipe, progress=False, device="cpu")
    assert torch.equal(default[0][layer, level].head.weight, explicit[0][layer, level].head.weight)
    assert default[0][layer, level].val_accs == explicit[0][layer, level].val_accs
    assert explicit[1][layer, level].device.type == "cpu" and explicit[1][layer, level].dtype == torch.float16
    # heads train on the stand-in from features computed on the CPU; validation stops at its values
    with pytest.raises(NotImplementedError, match="meta"), SameDevice():
        train_online(*args, recipe=recipe, progress=False, device="meta")
