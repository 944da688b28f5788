"""Flags shared by subcommands, so every command names a base the same way."""

from __future__ import annotations

import argparse


def add_base_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("base model")
    g.add_argument("--model", required=required, metavar="NAME",
                   help="timm ViT/DeiT name, e.g. vit_base_patch16_224")
    g.add_argument("--weights", metavar="FILE",
                   help="local weights file (.safetensors, timm .pth/.bin, or JAX .npz)")
    g.add_argument("--pretrained", action="store_true",
                   help="let timm download pretrained weights instead (needs a reachable model hub)")


def load_base_from_args(args):
    from medlego.runtime.base import load_base

    return load_base(args.model, args.weights, pretrained=args.pretrained)


def add_registry_args(p: argparse.ArgumentParser) -> None:
    """Where the adapter registry is: the same flags for every command that opens it."""
    g = p.add_argument_group("registry")
    g.add_argument("--data-dir", metavar="DIR",
                   help="registry folder: the embedded index and store, and the node cache "
                        "(default $MEDLEGO_DATA_DIR or ~/.medlego)")
    g.add_argument("--registry", metavar="URL",
                   help="index database: 'sqlite' (the default, <data-dir>/registry.db) or "
                        "postgresql://USER@HOST:PORT/DB (also postgresql://USER@/DB?host=/socket/dir)")
    g.add_argument("--store", metavar="URL",
                   help="adapter files: <data-dir>/store by default, or s3://BUCKET/PREFIX (endpoint and "
                        "credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION)")
    g.add_argument("--cache-dir", metavar="DIR", help="node-local cache of an S3 store (default <data-dir>/cache)")
    g.add_argument("--cache-max-bytes", type=int, default=None, metavar="BYTES",
                   help="size bound of that cache (default 2 GiB; give the server's [registry] cache_max_bytes)")


def registry_from_args(args, base=None, max_rank: int | None = None, *, create: bool = False):
    """The Registry that add_registry_args' flags name; `base` (a loaded base) is what uploads must fit.
    Only a command that registers (``create``) may make the registry's folders: any other command on a
    registry that is not there stops with one line, and creates nothing."""
    from medlego.runtime.config import DATA_DIR_ENV, default_data_dir
    from medlego.runtime.errors import BadInputError
    from medlego.runtime.registry import Registry

    data_dir = default_data_dir(args.data_dir)
    if not create:
        local = args.registry in (None, "", "sqlite") and args.store in (None, "")  # (URLs are checked by opening)
        if local and not (data_dir / "registry.db").is_file():
            raise BadInputError(f"no registry at {data_dir} (registry.db not found): give --data-dir DIR "
                                f"(or set {DATA_DIR_ENV}); `medlego registry add` creates one")
    return Registry(data_dir, base=base.spec if base else None, max_rank=max_rank,
                    input_size=base.input_size if base else None, url=args.registry, store=args.store,
                    cache_dir=args.cache_dir, **_cache_bound(args))


def _cache_bound(args) -> dict:
    bound = getattr(args, "cache_max_bytes", None)
    if bound is None:
        return {}
    if bound < 1:
        from medlego.runtime.errors import BadInputError

        raise BadInputError(f"bad --cache-max-bytes {bound}: a positive number of bytes")
    return {"cache_max_bytes": bound}


def add_adapter_args(p: argparse.ArgumentParser) -> None:
    """--adapter (a file or a registered name), where registered names live, and which of its tasks."""
    p.add_argument("--adapter", required=True, help="adapter file or registered NAME[@VERSION] or alias")
    p.add_argument("--data-dir", metavar="DIR", help="registry folder for registered names "
                                                     "(default $MEDLEGO_DATA_DIR or ~/.medlego)")
    p.add_argument("--task", help="which of the adapter's tasks (needed when it carries several)")


def load_base_and_adapter(args):
    """(base, adapter) that add_base_args' and add_adapter_args' flags name; the adapter must fit the base."""
    from medlego.runtime.refs import load_adapter_ref

    from .checks import check_readable

    if args.adapter.endswith(".safetensors"):  # a file, as load_adapter_ref reads it: found before the base loads
        check_readable([args.adapter])
    base = load_base_from_args(args)
    adapter, _ = load_adapter_ref(args.adapter, data_dir=args.data_dir, expected_base=base.spec)
    return base, adapter


def add_listing_args(p: argparse.ArgumentParser) -> None:
    """A listing is paged (a registry may hold tens of thousands of versions): the same flags for
    `registry list` and `client list`."""
    g = p.add_argument_group("paging and filters")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="versions per page: 1 to 1000 (default 100)")
    g.add_argument("--cursor", metavar="CURSOR", help="start after the page that printed this cursor")
    g.add_argument("--all", action="store_true", help="follow the cursors: every page, one after the other")
    add_filter_args(p, g)


def add_filter_args(p: argparse.ArgumentParser, group=None) -> None:
    """What a listing (or a warm-up) is narrowed to."""
    g = group or p.add_argument_group("filters")
    g.add_argument("--prefix", metavar="TEXT", help="only names starting with TEXT")
    g.add_argument("--task", metavar="TASK", help="only adapters with this task")
    g.add_argument("--base", metavar="FINGERPRINT", help="only adapters for this base (its whole fingerprint)")
