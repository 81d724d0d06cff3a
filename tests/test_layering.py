"""The architecture's import rules, read from the code with ast (nothing is imported)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RULES = [
    ("protocol", {"websockets", "asyncio", "sqlite3", "socket", "transformers", "peft", "bitsandbytes",
                  "coordinator", "edge_client"}, ()),
    ("protocol", {"torch"}, ("perturb.py",)),
    ("coordinator", {"torch", "transformers", "peft", "bitsandbytes", "edge_client", "numpy"}, ()),
    ("edge_client", {"coordinator", "sqlite3"}, ()),
    # The memory model, chooser and device table are plain arithmetic; only the profiler
    # runs models (in child processes).
    ("profiles", {"torch", "transformers", "peft", "bitsandbytes", "coordinator", "websockets"}, ("profiler.py",)),
]


def imported_modules(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module.split(".")[0]


def test_layers_import_only_what_they_may():
    breaches = []
    for folder, banned, exempt in RULES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name in exempt:
                continue
            for line, module in imported_modules(path):
                if module in banned:
                    breaches.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert breaches == []


def test_only_the_ledger_touches_sqlite():
    users = [p.relative_to(ROOT).as_posix() for folder in ("protocol", "coordinator", "edge_client", "profiles")
             for p in (ROOT / folder).rglob("*.py") if any(m == "sqlite3" for _, m in imported_modules(p))]
    assert users == ["coordinator/ledger.py"]
