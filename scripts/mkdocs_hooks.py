"""mkdocs hooks (mkdocs.yml `hooks:`): README.md is the home page, and links that leave docs/ work on the site.

- The home page (docs/index.md) is README.md, with its links resolved from the repository root, so the front door
  on GitHub and on the site is one text.
- A link or image that leaves docs/ (an example folder's heatmap, a benchmark's samples, a model card) must name
  a file of the repository, or the build warns (and `mkdocs build --strict` fails). A Markdown file there is shown
  as its repository path, since the site renders only docs/; any other file (an image, a JSON result) is copied
  into the site under `repo/` and linked there.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parents[1]
HOME = "index.md"
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
log = logging.getLogger("mkdocs.hooks.repo_links")


def _base(src_uri: str) -> Path:
    """The folder that a page's relative links start from, as its text is written in the repository."""
    return REPO if src_uri == HOME else (REPO / "docs" / src_uri).parent


def _text(src_uri: str, markdown: str) -> str:
    return (REPO / "README.md").read_text(encoding="utf-8") if src_uri == HOME else markdown


def _targets(markdown: str):
    """Yields (match, target) for each link outside fenced code blocks."""
    fence = False
    offset = 0
    for line in markdown.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence:
            for match in LINK.finditer(line):
                yield offset, match
        offset += len(line)


def _outside(path: Path, docs: Path) -> bool:
    return docs not in path.parents


def _resolve(src_uri: str, target: str) -> tuple[Path, str] | None:
    """The repository file a relative link names (and its #fragment); None for URLs and same-page anchors."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return None
    path, _, fragment = target.partition("#")
    resolved = Path(posixpath.normpath((_base(src_uri) / path).as_posix()))
    return resolved, ("#" + fragment if fragment else "")


def on_files(files, config):
    docs = Path(config["docs_dir"]).resolve()
    pages = [(f.src_uri, Path(f.abs_src_path).read_text(encoding="utf-8")) for f in files.documentation_pages()]
    for src_uri, markdown in pages:
        for _, match in _targets(_text(src_uri, markdown)):
            resolved = _resolve(src_uri, match.group(3))
            if resolved is None:
                continue
            path = resolved[0]
            if _outside(path, docs) and path.is_file() and path.suffix != ".md":
                uri = "repo/" + path.relative_to(REPO).as_posix()
                if files.get_file_from_path(uri) is None:
                    files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    src_uri = page.file.src_uri
    docs = Path(config["docs_dir"]).resolve()
    markdown = _text(src_uri, markdown)
    page_dir = (docs / src_uri).parent
    pieces, last = [], 0
    for offset, match in _targets(markdown):
        bang, label, target = match.groups()
        resolved = _resolve(src_uri, target)
        if resolved is None:
            continue
        path, fragment = resolved
        if not _outside(path, docs):
            new = f"{bang}[{label}]({Path(posixpath.relpath(path, page_dir)).as_posix()}{fragment})"
        elif not path.exists():
            log.warning("%s: the link %s names no file of the repository", src_uri, target)
            continue
        elif path.suffix == ".md" or path.is_dir():
            new = f"{label} (`{path.relative_to(REPO).as_posix()}`)"
        else:
            copy = docs / "repo" / path.relative_to(REPO)
            new = f"{bang}[{label}]({Path(posixpath.relpath(copy, page_dir)).as_posix()}{fragment})"
        pieces += [markdown[last : offset + match.start()], new]
        last = offset + match.end()
    return "".join(pieces) + markdown[last:]
