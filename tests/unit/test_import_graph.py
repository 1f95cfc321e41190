"""The rooms and the arrows between them, read from every module's imports.

Rooms, by who runs them: the contract (``queueformer.contract``), the server stores
(``queueformer.server``), the SDK and CLI (the rest of ``queueformer``), the HTTP API (``api``) and the
workers (``workers``). Arrows point toward the contract: the contract imports none of the others; the
SDK and CLI import only the contract (and the server side lazily, inside the commands that run it);
the server stores import the contract; the API and the workers import the contract and the server
stores, and never each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("queueformer", "api", "workers")

# room -> the rooms it may import at module level, and the ones it may import inside a function
ALLOWED: dict[str, tuple[set[str], set[str]]] = {
    "contract": ({"contract"}, set()),
    "server": ({"contract", "server"}, set()),
    "sdk": ({"contract", "sdk"}, {"server"}),
    "api": ({"contract", "server", "api"}, set()),
    "workers": ({"contract", "server", "workers"}, set()),
}
# Third-party packages the contract, SDK and CLI may import: the base dependencies and the stdlib.
BASE_DEPS = {"pydantic", "pydantic_settings", "yaml", "httpx", "rich"}
HEAVY = {"torch", "transformers", "bitsandbytes", "accelerate", "peft", "redis", "celery", "kombu", "fsspec"}


def room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "queueformer":
        if len(parts) > 1 and parts[1] in ("contract", "server"):
            return parts[1]
        return "sdk"
    return parts[0] if parts[0] in ("api", "workers") else None


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = path
    return out


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, whether the import sits inside a function) for every import in a file."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((a.name, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, inner))
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # typing-only imports are not arrows at run time
            visit(child, inner)

    visit(tree, False)
    return found


def test_arrows_point_only_toward_the_contract() -> None:
    wrong = []
    arrows: set[tuple[str, str]] = set()
    for name, path in modules().items():
        src = room(name)
        assert src is not None
        top, lazy = ALLOWED[src]
        for target, nested in imports(path):
            dst = room(target)
            if dst is None:
                if src in ("contract", "sdk") and not nested and target.split(".")[0] in HEAVY:
                    wrong.append(f"{name} imports {target} (not a base dependency)")
                continue
            arrows.add((src, dst))
            if dst not in top and not (nested and dst in lazy):
                wrong.append(f"{name} ({src}) imports {target} ({dst}){' inside a function' if nested else ''}")
    assert wrong == []
    assert ("sdk", "workers") not in arrows and ("api", "workers") not in arrows and ("workers", "api") not in arrows


def test_the_contract_sdk_and_cli_load_without_server_or_heavy_packages() -> None:
    code = (
        "import sys, pkgutil, importlib\n"
        "import queueformer.contract as c\n"
        "for m in pkgutil.walk_packages(c.__path__, 'queueformer.contract.'):\n"
        "    importlib.import_module(m.name)\n"
        "import queueformer.client, queueformer.bulk, queueformer.cli\n"
        "queueformer.cli.build_parser()\n"
        f"print(sorted(m for m in {sorted(HEAVY | {'api', 'workers', 'queueformer.server'})!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
