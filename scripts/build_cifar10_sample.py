"""Rebuild ``data/cifar10-sample`` (the embedded CIFAR-10 sample) from any full copy in Hub layout.

The draw depends only on pixel values, never on row order or on how the source encoded its PNGs,
so ``uoft-cs/cifar10`` from the Hub and a local copy of it give the same files::

    python scripts/build_cifar10_sample.py --source uoft-cs/cifar10
    python scripts/build_cifar10_sample.py --source path/to/cifar10 --check   # compare with the committed files

Per class, the images with the smallest ``sha256(seed || RGB pixels)`` are kept (a seeded, class-balanced,
order-free random draw), rows are ordered by that key (so any prefix is roughly balanced), and each image
is re-encoded as PNG (lossless) by Pillow, so the bytes do not depend on the source's encoder.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

OUTPUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "cifar10-sample")
PER_CLASS = {"train": 500, "test": 100}


def draw_key(seed: int, pixels: np.ndarray) -> bytes:
    """The sort key of one (32, 32, 3) uint8 image: sha256 of the seed and its raw pixels."""
    return hashlib.sha256(seed.to_bytes(8, "little") + np.ascontiguousarray(pixels).tobytes()).digest()


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def sample_split(dataset, per_class: int, seed: int) -> pa.Table:
    """``per_class`` images of each class of ``dataset`` (columns img/label) as an Arrow table."""
    import datasets

    images = dataset.cast_column("img", datasets.Image(decode=False))
    keyed = []
    for row in images:
        pixels = np.asarray(Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB"))
        keyed.append((draw_key(seed, pixels), row["label"], pixels))
    chosen = []
    for label in sorted({label for _, label, _ in keyed}):
        of_class = sorted((k for k in keyed if k[1] == label), key=lambda k: k[0])
        if len(of_class) < per_class:
            raise SystemExit(f"build_cifar10_sample: error: class {label} has {len(of_class)} images, "
                             f"fewer than {per_class}: pass the full CIFAR-10 as --source.")
        chosen += of_class[:per_class]
    chosen.sort(key=lambda k: k[0])
    features = dataset.features
    schema = features.arrow_schema
    return pa.table(
        {
            "img": [{"bytes": png_bytes(pixels), "path": None} for _, _, pixels in chosen],
            "label": [label for _, label, _ in chosen],
        },
        schema=schema,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="Full CIFAR-10 in Hub layout: uoft-cs/cifar10 or a folder.")
    parser.add_argument("--output_dir", default=OUTPUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="Compare with the files in --output_dir, write nothing.")
    args = parser.parse_args(argv)
    import datasets

    full = datasets.load_dataset(args.source)
    target = os.path.join(args.output_dir, "plain_text")
    os.makedirs(target, exist_ok=True)
    mismatches = []
    for split, per_class in PER_CLASS.items():
        table = sample_split(full[split], per_class, args.seed)
        path = os.path.join(target, f"{split}-00000-of-00001.parquet")
        with tempfile.NamedTemporaryFile(dir=target, suffix=".tmp", delete=False) as handle:
            pq.write_table(table, handle.name, compression="snappy", row_group_size=1000)
        with open(handle.name, "rb") as new:
            new_bytes = new.read()
        if args.check:
            os.unlink(handle.name)
            same = os.path.exists(path) and open(path, "rb").read() == new_bytes
            print(f"{split}: {'identical' if same else 'DIFFERENT'} ({len(new_bytes):,} bytes rebuilt)")
            mismatches += [] if same else [split]
        else:
            os.replace(handle.name, path)
            print(f"{split}: {table.num_rows} images, {len(new_bytes):,} bytes, "
                  f"sha256 {hashlib.sha256(new_bytes).hexdigest()} -> {path}")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
