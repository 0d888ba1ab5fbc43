"""The repository runs anywhere: nothing users get names a folder that only this project's machines have."""

from __future__ import annotations

import re

import datasets
from conftest import CIFAR10_SAMPLE, REPO_ROOT

# "../<name>", "/<name>/" or a quoted "<name>" path part; the name is split so that this file passes its own check.
MACHINE_FOLDER = "sha" + "red"
NAMES_MACHINE_FOLDER = re.compile(rf"""(\.\./|/|["']){MACHINE_FOLDER}(/|["'])""")


def files_naming_machine_folder(paths) -> list[str]:
    return [str(p.relative_to(REPO_ROOT)) for p in paths if p.is_file()
            and NAMES_MACHINE_FOLDER.search(p.read_text(encoding="utf-8", errors="ignore"))]


def test_the_check_catches_the_ways_to_name_the_folder(tmp_path):
    for i, line in enumerate([f'REPO_ROOT.parent / "{MACHINE_FOLDER}" / "data"', f"--dataset ../{MACHINE_FOLDER}/data",
                              f"os.path.join(REPO, '{MACHINE_FOLDER}', 'data')"]):
        (tmp_path / f"{i}.py").write_text(line)
    (tmp_path / "ok.py").write_text(f"# {MACHINE_FOLDER} fixtures and {MACHINE_FOLDER}_cache are fine\n")
    named = [p.rsplit("/", 1)[-1] for p in map(str, sorted(tmp_path.iterdir()))
             if NAMES_MACHINE_FOLDER.search(open(p).read())]
    assert named == ["0.py", "1.py", "2.py"]


def test_no_test_reads_the_machine_folder():
    assert files_naming_machine_folder(sorted((REPO_ROOT / "tests").rglob("*"))) == []


def test_public_files_name_the_data_set_not_the_machine_folder():
    public = [REPO_ROOT / "README.md", *(REPO_ROOT / "docs").rglob("*.md"),
              *(REPO_ROOT / "examples").rglob("README.md"), *(REPO_ROOT / "examples").rglob("*.json"),
              *(REPO_ROOT / "examples").rglob("results.md"),
              *(REPO_ROOT / "ddae_diffusers").rglob("*.py"), *(REPO_ROOT / "training").rglob("*.py")]
    assert files_naming_machine_folder(public) == []


def test_embedded_sample_is_real_balanced_cifar10():
    sample = datasets.load_dataset(CIFAR10_SAMPLE)
    assert {split: len(sample[split]) for split in sample} == {"train": 5000, "test": 1000}
    assert sample["train"].features["label"].names[:3] == ["airplane", "automobile", "bird"]
    for split, per_class in (("train", 500), ("test", 100)):
        assert sorted(sample[split]["label"]) == sorted(list(range(10)) * per_class)
    image = sample["test"][0]["img"]
    assert image.size == (32, 32) and image.mode == "RGB" and image.format == "PNG"
    assert len(set(sample["train"]["label"][:100])) == 10  # rows are shuffled: any prefix mixes the classes
    size = sum(p.stat().st_size for p in (REPO_ROOT / "data" / "cifar10-sample").rglob("*"))
    assert size < 15 * 2**20
