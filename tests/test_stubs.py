"""The committed stub file and the compiled extension list the same public names."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pyllama
from pyllama import _core

STUB = Path(pyllama.__file__).with_name("_core.pyi")


def stub_names() -> tuple[set[str], dict[str, set[str]]]:
    tree = ast.parse(STUB.read_text(encoding="utf-8"))
    top: set[str] = set()
    members: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            top.add(node.target.id)
        if isinstance(node, ast.ClassDef):
            names = set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    names.add(item.name)
                elif isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
            members[node.name] = names
    return top, members


def test_module_level_names_match() -> None:
    top, _ = stub_names()
    runtime = {n for n in dir(_core) if not (n.startswith("__") and n != "__version__")}
    assert top == runtime


DUNDERS = {"__init__", "__enter__", "__exit__", "__len__"}


def relevant(name: str) -> bool:
    return not name.startswith("_") or name in DUNDERS


def test_class_members_match() -> None:
    _, members = stub_names()
    for cls_name, names in members.items():
        cls = getattr(_core, cls_name)
        if inspect.isclass(cls) and issubclass(cls, BaseException):
            continue
        if cls_name == "TokenAttr":
            assert names == set(cls.__members__)
            continue
        runtime = {n for n in vars(cls) if relevant(n)}
        if "__init__" in runtime and not (cls.__init__.__doc__ or "").startswith("__init__("):
            runtime.discard("__init__")  # pybind11's stand-in for a class Python cannot construct
        stub = {n for n in names if relevant(n)}
        assert stub == runtime, f"{cls_name}: only in stub {stub - runtime}, only in extension {runtime - stub}"


def test_package_is_typed() -> None:
    assert STUB.with_name("py.typed").is_file()
