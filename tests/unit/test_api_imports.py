"""The API imports only the contract: never torch, transformers, bitsandbytes or accelerate."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "bitsandbytes", "accelerate", "peft", "workers")


def test_importing_the_api_app_leaves_heavy_packages_out() -> None:
    code = (
        "import sys\n"
        "from api.app import create_app\n"
        "from queueformer.contract.settings import load_settings\n"
        "app = create_app(load_settings(redis_url='redis://127.0.0.1:1/0'))\n"
        "import queueformer.client, queueformer.cli, queueformer.server.batches, queueformer.bulk\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_contract_modules_do_not_import_workers_or_api() -> None:
    code = (
        "import sys, pkgutil, importlib, queueformer\n"
        "for m in pkgutil.walk_packages(queueformer.__path__, 'queueformer.'):\n"
        "    importlib.import_module(m.name)\n"
        f"print(sorted(m for m in {(*HEAVY, 'api')!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
