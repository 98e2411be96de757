"""The README and docs/ are checked like code: a renamed module, option or page breaks a test.

- README.md stays under 16 KB (the reference lives in docs/);
- every Python example (```python blocks, and `python - <<'PY'` here-documents in shell
  blocks) compiles, and each `mpitrain...` name it imports or uses exists;
- every `mpitrain ...` line of a shell example parses with the real command-line parser
  (parsed only, never run);
- every relative link points at a file that exists, and its #anchor at a heading there.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
README_LIMIT = 16 * 1024
SHELL = {"bash", "sh", "console", "shell"}
# Shell lines that cannot parse as printed, with the reason; keep this short and visible.
PLACEHOLDER_LINES: dict[str, str] = {}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Block:
    page: Path
    line: int  # of the first line inside the fence, 1-based
    lang: str
    text: str

    def where(self, offset: int = 0) -> str:
        return f"{_rel(self.page)}:{self.line + offset}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a markdown page; an unclosed fence is an error."""
    found: list[Block] = []
    lang: str | None = None  # inside a fence: its language
    start = 0  # the fence's first line inside
    body: list[str] = []  # its lines so far
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if lang is None:
            if line.startswith("```"):
                lang, start, body = line[3:].strip().split(" ")[0].lower(), number + 1, []
        elif line.startswith("```"):
            found.append(Block(page, start, lang, "\n".join(body) + "\n"))
            lang = None
        else:
            body.append(line)
    assert lang is None, f"{_rel(page)}:{start - 1}: a code fence is never closed"
    return found


HEREDOC = re.compile(r"\bpython[\w.]*\b[^\n]*?<<-?\s*(['\"]?)(\w+)\1")


def python_sources(page: Path) -> list[tuple[str, str]]:
    """(where, code) of every Python example on a page."""
    out = []
    for block in blocks(page):
        if block.lang in ("python", "py"):
            out.append((block.where(), block.text))
        elif block.lang in SHELL:
            out.extend(_heredocs(block))
    return out


def _heredocs(block: Block) -> list[tuple[str, str]]:
    lines, out, i = block.text.splitlines(), [], 0
    while i < len(lines):
        match = HEREDOC.search(lines[i])
        i += 1
        if match:
            end = next((j for j in range(i, len(lines)) if lines[j].strip() == match[2]), None)
            assert end is not None, f"{block.where(i - 1)}: here-document {match[2]} is never closed"
            out.append((block.where(i), "\n".join(lines[i:end]) + "\n"))
            i = end + 1
    return out


def mpitrain_names(tree: ast.AST) -> set[str]:
    """Dotted names under `mpitrain` that the code imports, or uses through `import mpitrain...`."""
    names, bound = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mpitrain":
                    names.add(alias.name)
                    bound.add(alias.asname or "mpitrain")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mpitrain":
            names.update(f"{node.module}.{a.name}" for a in node.names if a.name != "*")
    for node in ast.walk(tree):
        if "mpitrain" in bound and isinstance(node, ast.Attribute) and _dotted(node).startswith("mpitrain."):
            names.add(_dotted(node))
    return names


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def resolves(dotted: str) -> bool:
    """Whether `mpitrain.a.b` names a module or an attribute of one (submodules imported as needed)."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 2):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if e.name and ".".join(parts[:i]).startswith(e.name):
                return False
            raise  # a dependency of a module that exists: not the doc's fault, show it
    return True


def mpitrain_argv(line: str) -> list[str] | None:
    """The arguments after `mpitrain` on a shell line that runs it, else None."""
    line = line.strip()
    line = line[2:] if line.startswith("$ ") else line
    words = shlex.split(line, comments=True)
    if words and (words[0] == "mpitrain" or words[0].endswith("/bin/mpitrain")):
        return words[1:]
    if words and words[0] in ("mpiexec", "mpirun", "srun") and "mpitrain" in words:
        at = words.index("mpitrain")
        return words[at + 1 :] if words[at - 1] == "-m" else None
    return None


def shell_commands() -> list[tuple[str, str, list[str]]]:
    """(where, line, argv) of every mpitrain command line in the shell examples."""
    out = []
    for page in _pages():
        for block in (b for b in blocks(page) if b.lang in SHELL):
            for offset, line in _logical_lines(block.text):
                argv = mpitrain_argv(line)
                if argv is not None:
                    out.append((block.where(offset), line.strip(), argv))
    return out


def _logical_lines(text: str):
    """Lines with backslash continuations joined, each with its offset in the block."""
    pending, first = "", 0
    for offset, line in enumerate(text.splitlines()):
        if not pending:
            first = offset
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield first, pending + line
        pending = ""


def parse_error(argv: list[str]) -> str | None:
    """argparse's complaint about argv, or None when it parses (--help/--version count as parsing)."""
    from mpitrain.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            return err.getvalue().strip() or f"exit {e.code}"
    return None


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(page: Path) -> list[str]:
    """Markdown link targets on a page, outside code, that are not URLs."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a page."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def link_problem(page: Path, target: str) -> str | None:
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
        return f"{target}: no such file"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{target}: no heading #{anchor} in {_rel(dest)}"
    return None


# ---- the tests


def test_the_readme_stays_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; move reference text to docs/ (limit {README_LIMIT})"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_compile_and_import_what_exists(page):
    bad = []
    for where, code in python_sources(page):
        try:
            tree = ast.parse(code, where)
            compile(tree, where, "exec")  # what only the compiler finds, e.g. `return` outside a function
        except SyntaxError as e:
            bad.append(f"{where}: does not compile: {e.msg} (line {e.lineno} of the example)")
            continue
        bad += [f"{where}: {name} does not exist" for name in sorted(mpitrain_names(tree)) if not resolves(name)]
    assert not bad, "\n".join(bad)


def test_every_shell_example_of_mpitrain_parses():
    bad, seen = [], 0
    for where, line, argv in shell_commands():
        if line in PLACEHOLDER_LINES:
            continue
        seen += 1
        problem = parse_error(argv)
        if problem:
            bad.append(f"{where}: {line}\n    {problem}")
    assert seen >= 20, f"only {seen} mpitrain command lines found in the docs: is the extraction broken?"
    assert not bad, "\n".join(bad)


def test_the_skipped_placeholder_lines_still_exist():
    # A skip for a line that is gone would hide nothing and rot; keep the list honest.
    lines = {line for _, line, _ in shell_commands()}
    assert not set(PLACEHOLDER_LINES) - lines


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_what_exists(page):
    bad = [problem for target in relative_links(page) if (problem := link_problem(page, target))]
    assert not bad, f"{_rel(page)}: " + "; ".join(bad)


def test_the_readme_links_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md links no page {missing}"


# ---- the checks above can fail: each is shown a broken example


def test_the_checks_catch_broken_examples(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n[ok](page.md#title) [gone](nowhere.md) [bad anchor](page.md#nope)\n\n"
        "```python\nfrom mpitrain.imagefolder import scan\nimport mpitrain\nmpitrain.no_such_thing()\n```\n\n"
        "```bash\n.venv/bin/python - <<'PY'\nfrom mpitrain.cache import load_images_cached\nPY\n"
        "mpitrain train --no-such-option \\\n  --epochs 2\n$ mpitrain train --epochs 2\n```\n"
        "```python\ndef broken(:\n```\n"
    )
    sources = python_sources(page)
    assert len(sources) == 3
    names = set().union(*(mpitrain_names(ast.parse(code)) for _, code in sources[:2]))
    assert {n for n in names if not resolves(n)} == {
        "mpitrain.imagefolder.scan",
        "mpitrain.no_such_thing",
        "mpitrain.cache.load_images_cached",
    }
    with pytest.raises(SyntaxError):
        compile(sources[2][1], "x", "exec")
    argvs = [mpitrain_argv(line) for _, line in _logical_lines(blocks(page)[1].text)]
    argvs = [a for a in argvs if a is not None]
    assert argvs == [["train", "--no-such-option", "--epochs", "2"], ["train", "--epochs", "2"]]
    assert "--no-such-option" in parse_error(argvs[0])
    assert parse_error(argvs[1]) is None
    assert (
        parse_error(["run", "-n", "2", "--no-such-flag", "s.py"]) is not None
    )  # a launcher option that does not exist
    assert parse_error(["run", "-n", "2", "s.py", "--its-own", "flag"]) is None  # the script's own arguments
    problems = [link_problem(page, t) for t in relative_links(page)]
    assert problems[0] is None and "no such file" in problems[1] and "no heading #nope" in problems[2]


def test_an_unclosed_fence_is_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```bash\nmpitrain train\n")
    with pytest.raises(AssertionError, match="never closed"):
        blocks(page)
