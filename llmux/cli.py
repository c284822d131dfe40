"""`llmux`: the operator's command, over the admin API of a running llmux.

    llmux ps                    what is where: name, type, size, where, in flight, last used
    llmux load NAME             make a model resident (the residency rules decide evictions)
    llmux unload NAME | --all   free the GPU of one model, or of all of them
    llmux check [--production]  run the acceptance plan (TST-001..022) and print its table
    llmux keys ...              generate api_keys.yaml (python -m llmux.keys)

The server: --url, else LLMUX_URL, else http://127.0.0.1:8081. The key (an admin key): --key,
else LLMUX_API_KEY, else the embedded default's key file. Exit status: 0 done, 1 the server
refused or failed (it says why; for check: a row failed), 2 usage, 3 the server cannot be
reached, 4 the key was refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

import yaml

from llmux import check, keys
from llmux.settings import Settings

DEFAULT_URL = "http://127.0.0.1:8081"
GIB = 1024**3


class CliError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def default_key() -> str | None:
    if key := os.environ.get("LLMUX_API_KEY"):
        return key
    path = Settings(embedded=True).api_keys_file
    if not path.exists():
        return None
    entries = (yaml.safe_load(path.read_text()) or {}).get("api_keys") or []
    admins = [e for e in entries if e.get("role") == "admin"] or entries
    return str(admins[0]["key"]) if admins else None


def call(url: str, key: str | None, method: str, path: str) -> dict[str, Any]:
    request = urllib.request.Request(url.rstrip("/") + path, method=method, data=None)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=600) as answer:
            body: dict[str, Any] = json.load(answer)
            return body
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        status = 4 if exc.code in (401, 403) else 1
        raise CliError(f"{exc.code}: {message}", status) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(
            f"cannot reach llmux at {url} ({reason}); is it running? (make serve, or --url)", 3
        ) from None


def ago(iso: str | None) -> str:
    if not iso:
        return "-"
    seconds = (datetime.now(UTC) - datetime.fromisoformat(iso)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def table(models: list[dict[str, Any]]) -> str:
    rows = [("NAME", "TYPE", "SIZE", "WHERE", "IN FLIGHT", "LAST USED")]
    for m in models:
        where = (
            "gpu" if m["where"] == "gpu" and m["state"] == "ready" else (m["state"] or m["where"])
        )
        rows.append(
            (
                m["id"],
                m["type"],
                f"{m['footprint_bytes'] / GIB:.1f} GB",
                where,
                str(m["in_flight"]),
                ago(m["last_used_at"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        return keys.main(argv[1:])
    parser = argparse.ArgumentParser(prog="llmux", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("LLMUX_URL", DEFAULT_URL))
    parser.add_argument("--key", default=None, help="an admin key (default: see llmux --help)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ps", help="what is where")
    load = commands.add_parser("load", help="make a model resident")
    load.add_argument("name", help="a model's name (virtual or physical)")
    unload = commands.add_parser("unload", help="free the GPU of a model, or of all")
    which = unload.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", help="a model's name (virtual or physical)")
    which.add_argument("--all", action="store_true", help="every resident model")
    commands.add_parser("keys", help="generate api_keys.yaml (python -m llmux.keys --help)")
    add_check_parser(commands)
    args = parser.parse_args(argv)
    key = args.key or default_key()
    if args.command == "check":
        return run_check(args, key)
    try:
        if args.command == "ps":
            print(table(call(args.url, key, "GET", "/admin/models")["models"]))
        elif args.command == "load":
            model = call(args.url, key, "POST", f"/admin/models/{args.name}/load")["model"]
            print(f"{model['id']} is resident ({model['footprint_bytes'] / GIB:.1f} GB)")
        else:
            path = "/admin/unload-all" if args.all else f"/admin/models/{args.name}/unload"
            unloaded = call(args.url, key, "POST", path)["unloaded"]
            print(f"unloaded: {', '.join(unloaded)}" if unloaded else "nothing to unload")
    except CliError as exc:
        print(f"llmux: {exc}", file=sys.stderr)
        return exc.status
    return 0


def add_check_parser(commands: Any) -> None:
    plan = commands.add_parser(
        "check",
        help="run the acceptance plan (TST-001..022) against the server",
        description="Run the acceptance plan against a running llmux and print a table of "
        "TST-001..022: pass, fail or skipped, the figures, and why. It loads, evicts and "
        "benchmarks models (an admin key). docs/deploy.md section 12 says what each row proves.",
    )
    plan.add_argument(
        "--production",
        action="store_true",
        help="the deployed box: the pod, a GPU and the production registry must be there (what "
        "is missing fails instead of being skipped)",
    )
    plan.add_argument("--gpu", action="store_true", help="a GPU is expected (no GPU fails)")
    plan.add_argument(
        "--public-url",
        default=os.environ.get("LLMUX_PUBLIC_URL"),
        help="llmux through Traefik, for TST-006 (e.g. http://kidirekt.kischdle.com)",
    )
    plan.add_argument("--only", help="these rows only, e.g. TST-004,TST-008")
    plan.add_argument("--json", action="store_true", help="the rows as JSON")
    plan.add_argument("--pod", default="llmux_pod")
    plan.add_argument("--container", default="llmux_ctr")
    plan.add_argument("--image", default=os.environ.get("LLMUX_IMAGE", "localhost/llmux:latest"))


def run_check(args: argparse.Namespace, key: str | None) -> int:
    only = [part.strip().upper() for part in args.only.split(",")] if args.only else None
    unknown = [row for row in only or [] if row not in check.IDS]
    if unknown:
        print(f"llmux check: no row {', '.join(unknown)} (TST-001..TST-022)", file=sys.stderr)
        return 2
    options = check.Options(
        url=args.url,
        key=key,
        production=args.production,
        gpu=args.gpu,
        public_url=args.public_url,
        pod=args.pod,
        container=args.container,
        image=args.image,
    )
    return check.run(options, only=only, as_json=args.json)


if __name__ == "__main__":
    raise SystemExit(main())
