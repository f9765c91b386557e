"""The package layout a newcomer can read: no import circles among ``bot/``, ``pipeline/`` and
``storage/``; production code never imports the stand-ins; ``bot/`` uses absolute imports only.

Imports are read with :mod:`ast`, wherever they sit in a module (a function-level import counts:
it cannot hide a circle). Stand-ins (``bot/standins``, ``pipeline/standins``) may be imported by the
tests, by each other, and by the operator tools in ``bot/ops`` (``opsbot demo`` plays a session
against the fake Feishu and the Coze simulator; ``--simulate`` hands the simulator to the worker).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bot", "pipeline", "storage")
STANDINS = ("bot.standins", "pipeline.standins")
MAY_USE_STANDINS = STANDINS + ("bot.ops",)


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The known modules ``module`` imports (``from pkg import mod`` names ``pkg.mod``)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    out.add(f"{base}.{alias.name}")
                elif base in known:
                    out.add(base)
    out.discard(module)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    found = modules(root)
    return {m: imports_of(m, p, set(found)) for m, p in found.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                circle = visit(nxt)
                if circle:
                    return circle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            circle = visit(start)
            if circle:
                return circle
    return None


def test_the_circle_finder_finds_circles():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_the_graph_sees_every_import_form(tmp_path):
    (tmp_path / "bot" / "chat").mkdir(parents=True)
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "storage").mkdir()
    for pkg in ("bot", "bot/chat", "pipeline", "storage"):
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "bot" / "chat" / "a.py").write_text("from bot.chat import b\n")
    (tmp_path / "bot" / "chat" / "b.py").write_text("def f():\n    import storage.c\n")
    (tmp_path / "storage" / "c.py").write_text("from .d import x\n")
    (tmp_path / "storage" / "d.py").write_text("from bot.chat.a import y\n")
    graph = import_graph(tmp_path)
    assert graph["bot.chat.a"] == {"bot.chat.b"}
    assert graph["bot.chat.b"] == {"storage.c"}
    assert graph["storage.c"] == {"storage.d"}
    assert find_circle(graph) == ["bot.chat.a", "bot.chat.b", "storage.c", "storage.d",
                                  "bot.chat.a"]


def test_no_import_circles():
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_production_code_never_imports_the_standins():
    bad = sorted(f"{m} imports {d}" for m, deps in import_graph().items()
                 if not _under(m, MAY_USE_STANDINS) for d in deps if _under(d, STANDINS))
    assert bad == []


def test_bot_uses_absolute_imports():
    """So a module reads the same wherever it sits, and /work-side tools can rewrite paths."""
    relative = sorted(f"{path.relative_to(ROOT)}:{node.lineno}"
                      for m, path in modules().items() if m.split(".")[0] == "bot"
                      for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                      if isinstance(node, ast.ImportFrom) and node.level)
    assert relative == []


def test_no_module_is_left_at_an_old_flat_path():
    """bot/ holds only the shared foundations and the two process entry points at top level."""
    top = sorted(p.stem for p in (ROOT / "bot").glob("*.py"))
    assert top == ["__init__", "app", "errors", "logs", "metrics", "service", "settings"]
    for package in ("web", "chat", "alerting", "feishu", "ops", "standins"):
        init = ROOT / "bot" / package / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), init


def test_the_readme_picture_names_every_bot_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    picture = readme.split("### Code layout", 1)[1].split("```")[1]
    named = set(picture.split())
    missing = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "bot").rglob("*.py")
                     if p.name != "__init__.py" and p.name not in named)
    missing += sorted(f"{p.parent.relative_to(ROOT)}/" for p in (ROOT / "bot").glob("*/__init__.py")
                      if f"{p.parent.name}/" not in named)
    assert missing == []
