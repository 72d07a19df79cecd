"""The import rule of README.md's Architecture section, enforced: every module of a layer imports
(at module level or lazily inside functions) only mxdit modules of its own layer or of the layers
listed before it.  Parsed with :mod:`ast`, so nothing is imported to check it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mxdit"

#: the README's layer order; top-level modules (cli, fsutil, __init__, __main__) are outside it
README_LAYERS = re.findall(r"^mxdit/(\w+)\s", (ROOT / "README.md").read_text().split("## Architecture", 1)[1]
                           .split("```", 2)[1], flags=re.M)

#: imports known to run against the order, with the issue that removes them.  Nothing may be added here.
KNOWN: set[tuple[str, str]] = set()


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in README_LAYERS else None


def _imports(path: Path, module: str):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this package
                base = module.split(".")[: -node.level] if not path.name == "__init__.py" else \
                    module.split(".")[: len(module.split(".")) - node.level + 1]
                yield ".".join(base + ([node.module] if node.module else [])), node.lineno
            elif node.module:
                yield node.module, node.lineno
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            # importlib.import_module("mxdit.x") / __import__("mxdit.x"): dynamic imports count too
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if fname in ("import_module", "__import__"):
                yield node.args[0].value, node.lineno


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)


def test_readme_lists_every_layer_package():
    packages = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert set(README_LAYERS) == packages, f"README layers {README_LAYERS} vs packages {sorted(packages)}"


def test_imports_follow_the_layer_order():
    order = {name: i for i, name in enumerate(README_LAYERS)}
    violations, used_known = [], set()
    for path, module in _modules():
        own = _layer(module)
        if own is None:
            continue
        for target, line in _imports(path, module):
            if not target.startswith("mxdit."):
                continue
            other = _layer(target)
            if other is None:
                if target.split(".")[1] == "cli" and own != "tools":
                    violations.append(f"{module}:{line} imports {target} (only tools may import the CLI)")
                continue
            if order[other] > order[own]:
                if (module, other) in KNOWN:
                    used_known.add((module, other))
                    continue
                violations.append(f"{module}:{line} ({own}) imports {target} ({other}, a later layer)")
    assert not violations, "imports against the layer order:\n" + "\n".join(violations)
    assert used_known == KNOWN, f"stale entries in KNOWN (remove them): {sorted(KNOWN - used_known)}"


def test_the_checker_sees_a_violation(tmp_path):
    """The parser finds module-level, lazy and relative imports (so the rule above can fail)."""
    src = tmp_path / "x.py"
    src.write_text("import mxdit.tools.generate\n\ndef f():\n    from mxdit.serve import app\n    from . import y\n"
                   "    import importlib\n    importlib.import_module('mxdit.loader')\n")
    found = [t for t, _ in _imports(src, "mxdit.formats.x")]
    assert found == ["mxdit.tools.generate", "mxdit.serve", "mxdit.formats", "importlib", "mxdit.loader"]


def test_tools_take_usage_error_from_mxdit_errors():
    """The tools import UsageError from mxdit.errors, never back from the CLI that runs them."""
    bad = []
    for path, module in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "mxdit.cli" \
                    and any(a.name == "UsageError" for a in node.names):
                bad.append(f"{module}:{node.lineno}")
    assert not bad, f"UsageError imported from mxdit.cli (use mxdit.errors): {bad}"
