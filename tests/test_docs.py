"""The docs cannot rot: every public name is in docs/api.md, every CLI option in docs/cli.md."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

import blockemu
import blockemu._core
import blockemu.drivers
import blockemu.migration
from blockemu.cli import build_parser
from blockemu.jobs import Job
from blockemu.machine import Machine

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
STUB = ROOT / "python" / "blockemu" / "_core.pyi"


def text(name: str) -> str:
    return (DOCS / name).read_text()


def section(doc: str, heading: str) -> str:
    """The text under the first heading line that contains ``heading``, up to the next heading
    of the same or a higher level."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#") and heading in line:
            level = len(line) - len(line.lstrip("#"))
            body = []
            for nxt in lines[i + 1 :]:
                lv = len(nxt) - len(nxt.lstrip("#"))
                if nxt.startswith("#") and lv <= level:
                    break
                body.append(nxt)
            return "\n".join(body)
    raise AssertionError(f"no heading with {heading!r}")


def mentioned(name: str, doc: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(name)}(?!\w)", doc) is not None


PUBLIC = sorted(
    {
        *blockemu.__all__,
        *blockemu._core.__all__,
        *blockemu.drivers.__all__,
        *blockemu.migration.__all__,
    }
)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_is_in_api_md(name: str) -> None:
    assert mentioned(name, text("api.md")), f"docs/api.md does not mention {name}"


def _stub_classes() -> dict[str, list[str]]:
    tree = ast.parse(STUB.read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            out[node.name] = [
                m.name
                for m in node.body
                if isinstance(m, ast.FunctionDef) and not m.name.startswith("_")
            ]
    return out


@pytest.mark.parametrize("cls", sorted(_stub_classes()))
def test_every_method_of_the_native_classes_is_in_api_md(cls: str) -> None:
    body = section(text("api.md"), f"### `{cls}`")
    missing = [m for m in _stub_classes()[cls] if not mentioned(m, body)]
    assert not missing, f"docs/api.md, section {cls}: missing {missing}"


def test_stub_functions_have_a_heading() -> None:
    tree = ast.parse(STUB.read_text())
    headings = [ln for ln in text("api.md").splitlines() if ln.startswith("### ")]
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            assert any(f"`{node.name}`" in h for h in headings), node.name


@pytest.mark.parametrize("cls", [Machine, Job])
def test_python_classes_are_documented(cls: type) -> None:
    own = [n for n, v in vars(cls).items() if not n.startswith("_")]
    body = section(text("api.md"), f"### `{cls.__name__}`")
    missing = [n for n in own if not mentioned(n, body)]
    assert not missing, f"docs/api.md, section {cls.__name__}: missing {missing}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_cli_option_is_in_cli_md(command: str) -> None:
    body = section(text("cli.md"), f"## blockemu {command}")
    sub = _subcommands()[command]
    for action in sub._actions:
        for opt in action.option_strings:
            if opt in ("-h", "--help"):
                continue
            assert mentioned(opt, body), f"docs/cli.md, {command}: {opt} missing"
        if action.choices and action.option_strings:
            for choice in action.choices:
                assert mentioned(str(choice), body), f"docs/cli.md, {command}: {choice}"


def test_readme_links_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in ("docs/concepts.md", "docs/api.md", "docs/cli.md"):
        assert name in readme
