"""The Python blocks of README.md and the guides (docs/*.md) run as written, offline.

Each ```python block runs in a temporary folder in which the repository's examples/ and data/ are reachable under
their own names. HTML comments on the lines right before a block (invisible on GitHub and on the site) say how:

- ``<!-- not-run: REASON -->``: not run, for the reason given (the Hub, a GPU, a download).
- ``<!-- run-by: tests/test_x.py -->``: that test module reads the page and runs the block.
- ``<!-- same-as: docs/page.md -->``: the same code as a block of that page, which is run.
- ``<!-- stand-in: "NAME" = VALUE -->``: the string literal "NAME" (a Hub id, or a folder an earlier command
  writes) becomes VALUE before the block runs: a repository path in quotes, or ``{name}``, a local model or export
  this module builds (see STAND_INS).
- ``<!-- slow: REASON -->``: run only with ``pytest -m slow``.

A block without any of these runs as it is.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*([a-z][a-z -]*?)\s*(?::\s*(.*?))?\s*-->$")
KINDS = {"not-run", "run-by", "same-as", "stand-in", "slow", "snippet"}
STAND_IN = re.compile(r'^("[^"]+")\s*=\s*("[^"]+"|\{[a-z0-9-]+\})$')


@dataclass
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence
    code: str
    markers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def runs_here(self) -> bool:
        return not ({"not-run", "run-by", "same-as"} & set(self.markers))


def read_blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].startswith("```python"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            block = Block(page.relative_to(REPO_ROOT).as_posix(), i + 1, "\n".join(lines[i + 1 : end]) + "\n")
            above = i - 1
            while above >= 0 and MARKER.match(lines[above].strip()):
                kind, value = MARKER.match(lines[above].strip()).groups()
                block.markers.setdefault(kind, []).insert(0, value or "")
                above -= 1
            blocks.append(block)
            i = end
        i += 1
    return blocks


BLOCKS = [block for page in PAGES for block in read_blocks(page)]


def test_every_page_block_is_found():
    assert any(block.page == "README.md" for block in BLOCKS)
    assert sum(block.runs_here for block in BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.where)
def test_markers_say_why_and_where(block):
    assert set(block.markers) <= KINDS, f"{block.where}: unknown marker in {sorted(block.markers)}"
    assert len({"not-run", "run-by", "same-as"} & set(block.markers)) <= 1, block.where
    for reason in block.markers.get("not-run", []) + block.markers.get("slow", []):
        assert reason.strip(), f"{block.where}: a not-run or slow marker needs a reason"
    for test in block.markers.get("run-by", []):
        path = REPO_ROOT / test
        assert path.is_file(), f"{block.where}: {test} does not exist"
        assert block.page in path.read_text(encoding="utf-8"), f"{block.where}: {test} does not read {block.page}"
    for page in block.markers.get("same-as", []):
        twins = [other for other in BLOCKS if other.page == page and other.code == block.code]
        assert twins, f"{block.where}: no block of {page} has the same code"
        assert not ({"not-run", "same-as"} & set(twins[0].markers)), f"{block.where}: {twins[0].where} is not run"
    for stand_in in block.markers.get("stand-in", []):
        match = STAND_IN.match(stand_in)
        assert match, f"{block.where}: write a stand-in as \"NAME\" = \"path\" or {{name}}, not {stand_in!r}"
        name, value = match.groups()
        assert name in block.code, f"{block.where}: the block does not name {name}"
        if value.startswith("{"):
            assert value[1:-1] in STAND_INS, f"{block.where}: no stand-in named {value}"
        else:
            assert (REPO_ROOT / value.strip('"')).exists(), f"{block.where}: {value} is not in the repository"


# --- the local stand-ins of Hub models and of folders that a page's earlier command writes ---


def ddpm_cifar10_32(folder: Path, built) -> str:
    """The google/ddpm-cifar10-32 layout and layer names, with narrow channels and random weights."""
    from test_pipeline import write_ddpm_cifar10_32_layout

    return write_ddpm_cifar10_32_layout(folder, block_out_channels=[32, 64, 64, 64], norm_num_groups=16)


def edm(folder: Path, built) -> str:
    """What `train_unconditional.py --model_config ddpm-tiny --objective edm` writes, at random init."""
    from diffusers import EDMEulerScheduler

    from ddae_diffusers import DDAEPipeline, build_denoiser

    DDAEPipeline(unet=build_denoiser("ddpm-tiny"), scheduler=EDMEulerScheduler()).save_pretrained(folder)
    return str(folder)


def cifar10_features(folder: Path, built) -> str:
    """docs/probing.md's `ddae-extract` command on 32 images of each split of the embedded sample."""
    from ddae_diffusers.probing.export import main

    main(["--model", built("ddpm-cifar10-32"), "--dataset", str(REPO_ROOT / "data" / "cifar10-sample"),
          "--layers", "up_blocks.1.resnets.2", "--timesteps", "10", "--max_samples", "32",
          "--output_dir", str(folder)])
    return str(folder)


STAND_INS = {"ddpm-cifar10-32": ddpm_cifar10_32, "edm": edm, "cifar10-features": cifar10_features}


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    built: dict[str, str] = {}

    def build(name: str) -> str:
        if name not in built:
            built[name] = STAND_INS[name](tmp_path_factory.mktemp(name), build)
        return built[name]

    return build


def runnable(block: Block, stand_in) -> str:
    code = block.code
    for stand_in_marker in block.markers.get("stand-in", []):
        name, value = STAND_IN.match(stand_in_marker).groups()
        code = code.replace(name, repr(stand_in(value[1:-1])) if value.startswith("{") else value)
    return code


RUN_HERE = [pytest.param(block, id=block.where, marks=[pytest.mark.slow] if "slow" in block.markers else [])
            for block in BLOCKS if block.runs_here]


@pytest.mark.parametrize("block", RUN_HERE)
def test_block_runs(block, stand_in, tmp_path, monkeypatch):
    code = runnable(block, stand_in)
    for name in ("examples", "data"):
        (tmp_path / name).symlink_to(REPO_ROOT / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, block.where, "exec"), {"__name__": "__docs__"})


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason='mkdocs is not installed: pip install -e ".[docs]"')
def test_the_site_builds_strictly(tmp_path):
    """Every link and anchor resolves, every API reference is found and every page is in the navigation."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
