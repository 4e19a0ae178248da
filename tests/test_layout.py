"""The package layout follows the data flow: each stage imports only shared modules, its own folder
and stages before it; nothing imports run/ or cli, and `import merge_cli.cli` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "merge_cli"
SHARED = {"config", "records", "errors", "hashing", "report"}
FLOW = ["inputs", "media", "models", "output"]
"""The stages in flow order: a stage may import the ones before it, never one after it."""


def _layer(module: str) -> str:
    """`merge_cli.media.images` -> `media`; `merge_cli.config` -> `config`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("merge_cli"):
            found += [node.module] if node.module != "merge_cli" else [f"merge_cli.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("merge_cli")]
    return found


def _allowed(source: str, target: str) -> bool:
    if target in SHARED or target in ("", "__version__") or target == source:
        return True
    if source in SHARED:
        return target in SHARED or target == "media"  # config holds a media.grid ResizePolicy
    if source in FLOW:
        return target in FLOW and FLOW.index(target) < FLOW.index(source)
    if source == "run":
        return target in FLOW
    return source in {"cli", "__main__", "__init__"}


def test_no_module_imports_against_the_flow():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        source = _layer(".".join(relative.parts)) if len(relative.parts) > 1 else ""
        source = source if source else relative.parts[-1]
        for module in _imports(path):
            target = _layer(module)
            if not _allowed(source, target):
                wrong.append(f"{relative}: imports {module}")
    assert not wrong, "\n".join(wrong)


def test_every_folder_says_what_it_owns():
    for folder in FLOW + ["run"]:
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) == 1, f"merge_cli/{folder}/__init__.py needs a one-line docstring"


def test_cli_import_stays_light():
    code = "import sys, merge_cli.cli; print(','.join(m for m in ('torch', 'h5py', 'decord', 'av', 'numpy') if m in sys.modules))"
    heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert heavy == "", f"import merge_cli.cli pulled in {heavy}"
