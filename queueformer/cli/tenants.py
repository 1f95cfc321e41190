"""``tenants``: a tenant's defaults (the priority of its jobs and of its batches), kept in its Redis record.

Like ``keys``, it talks to Redis directly (the server extra), imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys

from queueformer.contract.priority import MAX_PRIORITY, MIN_PRIORITY
from queueformer.contract.settings import load_settings


def add(sub: argparse._SubParsersAction) -> None:
    tenants = sub.add_parser("tenants", help="a tenant's defaults (priority of its jobs and batches)")
    tsub = tenants.add_subparsers(dest="tenants_command", required=True)
    show = tsub.add_parser("show", help="print a tenant's defaults")
    show.add_argument("tenant")
    show.set_defaults(func=run_tenants)
    set_ = tsub.add_parser(
        "set",
        help=f"set a tenant's default priorities ({MIN_PRIORITY} to {MAX_PRIORITY}, higher first); "
        "work submitted with its own priority keeps it",
    )
    set_.add_argument("tenant")
    set_.add_argument("--priority", type=int, help="default for its jobs (built-in default: 5)")
    set_.add_argument("--batch-priority", type=int, help="default for its batches (built-in default: 2)")
    set_.set_defaults(func=run_tenants)


def run_tenants(args: argparse.Namespace) -> int:
    try:
        import redis

        from queueformer.server.connection import connect
        from queueformer.server.tenants import TenantDefaults
    except ImportError as exc:
        sys.stderr.write(f"queueformer tenants: needs the server extra (pip install 'queueformer[server]'): {exc}\n")
        return 1
    try:
        defaults = TenantDefaults(connect(load_settings().redis()))
        if args.tenants_command == "set":
            now = defaults.set(args.tenant, priority=args.priority, batch_priority=args.batch_priority)
        else:
            now = defaults.get(args.tenant)
    except (ValueError, RuntimeError, redis.RedisError) as exc:
        sys.stderr.write(f"queueformer tenants: {' '.join(str(exc).split())}\n")
        return 1
    sys.stdout.write(f"{args.tenant}: priority {now.priority}, batch priority {now.batch_priority}\n")
    return 0
