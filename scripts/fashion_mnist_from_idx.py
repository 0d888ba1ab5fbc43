"""Write Fashion-MNIST from its original IDX files (e.g. the Debian package ``dataset-fashion-mnist``) as a data
set folder in the layout of the Hub's ``zalando-datasets/fashion_mnist`` (columns ``image``, ``label``), for
machines that cannot reach the Hub::

    python scripts/fashion_mnist_from_idx.py --source /usr/share/datasets/fashion-mnist --output_dir fashion_mnist
    ddae-probe --model examples/ddae-cifar10-cpu --dataset fashion_mnist ...
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import tempfile

import numpy as np

LABELS = [
    "T - shirt / top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]  # fmt: skip  (the Hub data set's ClassLabel names)
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}  # fmt: skip


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip) as a uint8 array: (N, 28, 28) images or (N,) labels."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist", help="Folder of the .gz IDX files.")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    import datasets
    from PIL import Image

    missing = [name for pair in FILES.values() for name in pair if not os.path.isfile(os.path.join(args.source, name))]
    if missing:
        raise SystemExit(
            f"fashion_mnist_from_idx: error: {args.source} lacks {', '.join(missing)}: install the "
            "Debian package dataset-fashion-mnist or pass the folder of the IDX files as --source."
        )
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=LABELS)})
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent)
    os.makedirs(os.path.join(staging, "fashion_mnist"))
    for split, (images_file, labels_file) in FILES.items():
        images = read_idx(os.path.join(args.source, images_file))
        labels = read_idx(os.path.join(args.source, labels_file))
        table = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(image, mode="L") for image in images], "label": labels.tolist()}, features
        )
        table.to_parquet(os.path.join(staging, "fashion_mnist", f"{split}-00000-of-00001.parquet"))
        print(f"{split}: {len(table)} images")
    if os.path.exists(args.output_dir):
        shutil.rmtree(args.output_dir)
    os.replace(staging, args.output_dir)


if __name__ == "__main__":
    main()
