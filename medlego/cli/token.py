"""`medlego token new --name N --role R`: a fresh caller token, printed once, and its tokens-file entry."""

from __future__ import annotations

import hashlib
import secrets

ROLES = ("admin", "diagnose", "read")


def register(sub) -> None:
    p = sub.add_parser("token", help="make tokens for named callers ([auth] tokens_file)")
    s = p.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    new = s.add_parser("new", help="print a fresh token once, and the [[token]] entry to add to the tokens file")
    new.add_argument("--name", required=True, help="the caller's name, as the audit log records it")
    new.add_argument("--role", required=True, choices=ROLES,
                     help="admin: everything; diagnose: diagnosis only; read: registry reads and the audit log")
    new.set_defaults(func=_new)


def _new(args) -> int:
    from medlego.runtime.errors import BadInputError

    name = args.name.strip()
    if not name or name in ("admin", "api", "anonymous") or any(c in name for c in "\"\\\n\r") or not name.isprintable():
        raise BadInputError(f"--name {args.name!r}: give a printable name other than admin, api or anonymous")
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    print(f"token (shown once; give it to {name}, it is not stored anywhere): {token}")
    print("add to the tokens file ([auth] tokens_file):")
    print()
    print("[[token]]")
    print(f'name = "{name}"')
    print(f'role = "{args.role}"')
    print(f'sha256 = "{digest}"')
    return 0
