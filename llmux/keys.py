"""API keys: one per client, in `api_keys.yaml` (a list of `{key, name, role}`).

A key's role is `client` (the default: every `/v1/*` route) or `admin` (also `/admin/*`: loading
and unloading models, for the operator and the `llmux` command).

Keys are compared in constant time and never logged; logs name the client. `python -m llmux.keys`
generates keys for named clients.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmux.core.config import ConfigError, describe_validation_error, read_yaml

KEY_PREFIX = "sk-llmux-"
DEFAULT_CLIENTS = ("open-webui", "whisper-clients", "opencode")


def create_keys_hint(path: Path) -> str:
    return f"create keys with `python -m llmux.keys --out {path}` and restart llmux"


class ApiKeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=16, description="The secret a client sends as a Bearer token.")
    name: str = Field(min_length=1, description="The client, as logs name it.")
    role: Literal["client", "admin"] = Field(
        "client", description="client: /v1/* only; admin: /v1/* and /admin/* (load, unload)."
    )


class ApiKeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    api_keys: list[ApiKeyEntry]


def _digest(secret: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison's time independent of key lengths.
    return hashlib.sha256(secret.encode("utf-8")).digest()


@dataclass(frozen=True)
class KeyRing:
    """The configured keys. `None` from `client_for` means the key is unknown."""

    _digests: tuple[tuple[bytes, str], ...]
    path: Path
    admins: frozenset[str] = frozenset()  # the names of the clients whose keys are admin keys

    @property
    def empty(self) -> bool:
        return not self._digests

    def client_for(self, presented: str) -> str | None:
        digest = _digest(presented)
        found: str | None = None
        # Check every key, without an early exit, so timing says nothing about which one matched.
        for known, name in self._digests:
            if hmac.compare_digest(known, digest):
                found = name
        return found

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        """Read the key file; a missing file gives an empty ring (every call then gets 401)."""
        if not path.exists():
            return cls((), path)
        data = read_yaml(path)
        try:
            parsed = ApiKeysFile.model_validate(data if data is not None else {"api_keys": []})
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(path, exc)) from None
        names = [entry.name for entry in parsed.api_keys]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{path}: api_keys: duplicate client names {duplicates}")
        keys = [entry.key for entry in parsed.api_keys]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"{path}: api_keys: the same key is listed twice")
        return cls(
            tuple((_digest(e.key), e.name) for e in parsed.api_keys),
            path,
            frozenset(e.name for e in parsed.api_keys if e.role == "admin"),
        )


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def write_key_file(
    path: Path, clients: list[str], *, force: bool = False, admins: list[str] | None = None
) -> dict[str, str]:
    """Write a fresh key per client to `path` with mode 0600; refuse to overwrite unless `force`.
    The clients named in `admins` (also given keys) get admin keys."""
    admins = admins or []
    names = [*clients, *admins]
    if len(set(names)) != len(names):
        raise ValueError("client names must be unique")
    keys = {client: new_key() for client in names}
    entries: list[dict[str, str]] = [
        {"key": key, "name": client, **({"role": "admin"} if client in admins else {})}
        for client, key in keys.items()
    ]
    text = yaml.safe_dump({"api_keys": entries}, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("# llmux API keys, one per client. Keep this file private (mode 0600).\n")
        handle.write(text)
    os.chmod(path, 0o600)  # O_TRUNC keeps an existing file's mode
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmux.keys",
        description="Generate one strong API key per client and write api_keys.yaml (mode 0600).",
    )
    parser.add_argument(
        "clients",
        nargs="*",
        default=list(DEFAULT_CLIENTS),
        help=f"client names (default: {' '.join(DEFAULT_CLIENTS)})",
    )
    parser.add_argument("--out", type=Path, required=True, help="the api_keys.yaml to write")
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    parser.add_argument(
        "--admin",
        action="append",
        default=[],
        metavar="NAME",
        help="also an admin key for NAME (reaches /admin/*: the `llmux` command); repeatable",
    )
    args = parser.parse_args(argv)
    try:
        keys = write_key_file(args.out, args.clients, force=args.force, admins=args.admin)
    except FileExistsError:
        print(f"{args.out} exists; pass --force to replace every key in it.", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(f"wrote {len(keys)} keys to {args.out} (mode 0600):")
    for client, key in keys.items():
        print(f"  {client}: {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
