"""The probe streams the feature cache: heads, kNN and scores read blocks of rows, never a whole split.

A scaled-down synthetic data set stands in for one the size of ImageNet-1k: features are written into a real cache
unit, then read back through ``FeatureTable``s by the grid's own functions.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import torch

from ddae_diffusers.probing.cache import CacheUnit, units_table
from ddae_diffusers.probing.heads import ProbeRecipe, head_accuracies, train_heads
from ddae_diffusers.probing.knn import knn_accuracies
from ddae_diffusers.probing.table import CHUNK_ROWS, FeatureTable, column_stats

LAYERS, DIMS = ["a", "b"], [8, 24]


def synthetic_unit(folder: str, num_rows: int, layers=LAYERS, dims=DIMS, seed: int = 0):
    """A filled cache unit of class-dependent features (10 classes) and its labels (N,)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (num_rows,), generator=generator)
    centres = torch.randn(10, sum(dims), generator=generator)
    unit = CacheUnit(folder, {"timestep": 0}, num_rows, layers, dims)
    unit.open()
    for start in range(0, num_rows, CHUNK_ROWS):
        ids = list(range(start, min(start + CHUNK_ROWS, num_rows)))
        block = centres[labels[ids]] + torch.randn(len(ids), sum(dims), generator=generator)
        unit.write(ids, dict(zip(layers, block.split(dims, dim=1), strict=True)))
    return unit, labels


class RecordingTable(FeatureTable):
    """A table that remembers how many rows each read asked for."""

    def __init__(self, table: FeatureTable):
        self.requests: list[int] = []

        def reader(rows, keys):
            self.requests.append(len(rows))
            return table._reader(rows, keys)

        super().__init__(table.dims, table.num_rows, reader)


def test_heads_knn_and_scores_read_bounded_blocks_and_match_in_memory_results(tmp_path):
    num_rows = 3 * CHUNK_ROWS + 100
    unit, labels = synthetic_unit(str(tmp_path / "unit"), num_rows)
    cached = units_table([unit])
    in_memory = FeatureTable.from_tensors(dict(cached))  # every column read whole, for reference
    assert torch.equal(in_memory["a", 0], unit.read()["a"])

    fit, val, test = np.arange(0, 8000), np.arange(8000, 10000), np.arange(10000, num_rows)
    recipe = ProbeRecipe(lrs=(1e-3, 1e-2), epochs=2, batch_size=256)
    runs = {}
    for name, table in {"cached": RecordingTable(cached), "memory": in_memory}.items():
        fits = train_heads(table.subset(fit), labels[fit], 10, recipe, table.subset(val), labels[val], seed=0)
        scores = head_accuracies({key: [f.head] for key, f in fits.items()}, table.subset(test), labels[test])
        knn = knn_accuracies(table.subset(fit), labels[fit], table.subset(test), labels[test])
        runs[name] = (fits, scores, knn)
        if name == "cached":
            assert max(table.requests) <= CHUNK_ROWS < len(fit)  # never a whole split at once
            assert recipe.batch_size in table.requests  # training reads one mini-batch at a time
    (fits, scores, knn), (fits_ref, scores_ref, knn_ref) = runs["cached"], runs["memory"]
    assert scores == scores_ref and knn == knn_ref
    for key in fits:
        assert torch.equal(fits[key].head.weight, fits_ref[key].head.weight)
        assert fits[key].val_accs == fits_ref[key].val_accs
    assert min(acc for (acc,) in scores.values()) > 0.5  # the classes are separable: the heads learned


def test_column_stats_match_whole_column_statistics():
    x = torch.randn(10_000, 5, dtype=torch.float64) * 3 + 1000  # a large mean: the blockwise merge must hold
    mean, var = column_stats(FeatureTable.from_tensors({"x": x}), chunk_size=999)["x"]
    assert torch.allclose(mean, x.mean(0).float()) and torch.allclose(var, x.var(0, unbiased=False).float())


def test_fused_and_stacked_tables_read_the_right_rows():
    a, b = torch.arange(12.0).reshape(6, 2), torch.arange(100.0, 106.0).reshape(6, 1)
    view0, view1 = FeatureTable.from_tensors({"a": a, "b": b}), FeatureTable.from_tensors({"a": -a, "b": -b})
    stacked = FeatureTable.concat_rows([view0.subset([4, 1]), view1.subset([2])])
    assert torch.equal(stacked["a"], torch.stack([a[4], a[1], -a[2]]))
    fused = stacked.fuse({"ab": ["a", "b"]})
    assert fused.dims == {"ab": 3}
    assert torch.equal(fused.read([2, 0])["ab"], torch.tensor([[-4.0, -5.0, -102.0], [8.0, 9.0, 104.0]]))


def test_peak_memory_of_heads_does_not_grow_with_the_cache(tmp_path):
    """200,000 rows x 512 fp16 features (195 MiB on disk, 390 MiB as float32): training heads over them and
    scoring kNN raise the process's peak RSS by far less than one float32 copy of the features (or than the
    file's pages, had it been memory-mapped)."""
    script = textwrap.dedent(f"""
        import resource, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_streaming import synthetic_unit
        from ddae_diffusers.probing.cache import units_table
        from ddae_diffusers.probing.heads import ProbeRecipe, train_heads
        from ddae_diffusers.probing.knn import knn_accuracies
        torch.set_num_threads(1)
        unit, labels = synthetic_unit({str(tmp_path / "big")!r}, 200_000, ["a", "b"], [256, 256])
        table = units_table([unit])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fits = train_heads(table, labels, 10, ProbeRecipe(lrs=(1e-3,), epochs=1, batch_size=1024))
        knn = knn_accuracies(table, labels, table.subset(range(100)), labels[:100])
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024, min(knn.values()))
    """)
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    growth_mib, knn = output.split()
    assert int(growth_mib) < 150, f"peak RSS grew by {growth_mib} MiB"
    assert float(knn) > 0.5  # the run did real work on the features


def test_cache_files_work_where_there_is_no_pread(tmp_path, monkeypatch):
    """Windows has no os.pread / os.pwrite: the unit seeks and reads instead, with the same bytes and checksums."""
    unit, _ = synthetic_unit(str(tmp_path / "posix"), 5000)
    rows = [4999, 3, 4, 5, 17]
    expected = unit.read(rows)
    monkeypatch.delattr(os, "pread")
    monkeypatch.delattr(os, "pwrite")
    other, _ = synthetic_unit(str(tmp_path / "portable"), 5000)
    reopened = CacheUnit(other.folder, other.key, other.num_rows, other.layers, other.dims)
    reopened.open()  # every recorded checksum verified by seek-and-read
    assert reopened.complete
    for layer, values in reopened.read(rows).items():
        assert torch.equal(values, expected[layer])
