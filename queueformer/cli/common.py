"""Shared CLI plumbing: the API address and key, and a client built from them."""

from __future__ import annotations

import argparse
import os

from queueformer.client import Client


def add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("QUEUEFORMER_URL", "http://127.0.0.1:8000"), help="API base URL")
    p.add_argument("--api-key", default=os.environ.get("QUEUEFORMER_API_KEY"), help="Bearer API key")


def client(args: argparse.Namespace) -> Client:
    return Client(args.url, api_key=args.api_key)
