"""Write Fashion-MNIST from its original IDX files (e.g. the Debian package ``dataset-fashion-mnist``) as a data
set folder in the layout of the Hub's ``zalando-datasets/fashion_mnist`` (columns ``image``, ``label``), for
machines that cannot reach the Hub::

    python scripts/fashion_mnist_from_idx.py --source /usr/share/datasets/fashion-mnist --output_dir fashion_mnist
    ddae-probe --model examples/ddae-cifar10-cpu --dataset fashion_mnist ...

``write_dataset`` (the Parquet writing, into a temporary folder renamed at the end) is shared with
``scripts/mnist_from_pickle.py``.
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


def write_dataset(output_dir: str, config: str, splits: dict, names: list[str]) -> None:
    """Writes ``splits`` (``{split: (images (N, H, W) uint8, labels (N,) ints)}``) as the Hub's Parquet layout,
    ``output_dir/config/{split}-00000-of-00001.parquet`` with columns ``image`` (grayscale, ``datasets.Image``)
    and ``label`` (``ClassLabel`` with ``names``). The files go to a temporary folder beside ``output_dir``, which
    replaces ``output_dir`` only once every split is written; a failure leaves ``output_dir`` as it was."""
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(output_dir))}-")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # as os.makedirs would (mkdtemp makes it private)
        os.makedirs(os.path.join(staging, config))
        for split, (images, labels) in splits.items():
            grayscale = [Image.fromarray(np.asarray(image, dtype=np.uint8)) for image in images]  # (H, W) -> "L"
            table = datasets.Dataset.from_dict({"image": grayscale, "label": np.asarray(labels).tolist()}, features)
            table.to_parquet(os.path.join(staging, config, f"{split}-00000-of-00001.parquet"))
            print(f"{split}: {len(table)} images")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    os.replace(staging, output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist", help="Folder of the .gz IDX files.")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    missing = [name for pair in FILES.values() for name in pair if not os.path.isfile(os.path.join(args.source, name))]
    if missing:
        raise SystemExit(
            f"fashion_mnist_from_idx: error: {args.source} lacks {', '.join(missing)}: install the "
            "Debian package dataset-fashion-mnist or pass the folder of the IDX files as --source."
        )
    splits = {split: [read_idx(os.path.join(args.source, name)) for name in pair] for split, pair in FILES.items()}
    write_dataset(args.output_dir, "fashion_mnist", splits, LABELS)


if __name__ == "__main__":
    main()
