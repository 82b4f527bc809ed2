"""Command line of the human evaluation: `python -m eval.human {export,serve,report}`.

    python -m eval.human export --eval-dir runs/tiny/eval --n 50 --seed 0 --out runs/tiny/human
    DETOX_HUMAN_TOKEN=secret python -m eval.human serve --items runs/tiny/human [--db FILE] [--host 127.0.0.1] [--port 8600]
    python -m eval.human report --items runs/tiny/human [--db FILE] [--key FILE] [--out DIR]

The server binds to 127.0.0.1 unless --host says otherwise; set DETOX_HUMAN_TOKEN to require an access token at
sign-in (do so whenever the server is reachable by others).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Optional

from eval.human.export import export_study
from eval.human.items import load_study
from eval.human.report import DB_FILE, write_report
from eval.human.store import AnswerStore
from train.cli import run_cli
from train.errors import ConfigError

TOKEN_ENV = "DETOX_HUMAN_TOKEN"
log = logging.getLogger("eval.human")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval.human", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="sample dialogues and write blinded items + the separate key")
    export.add_argument("--eval-dir", required=True, help="evaluation output (directory with examples.jsonl, or the file)")
    export.add_argument("--out", required=True, help="directory for items.jsonl, items.csv, manifest.json, key.json")
    export.add_argument("--n", type=int, default=50, help="number of dialogues to sample (default 50)")
    export.add_argument("--seed", type=int, default=0, help="sampling, slot-order and annotator-order seed")
    export.add_argument("--systems", help="comma-separated systems to compare (default: all in the evaluation)")
    export.add_argument("--force", action="store_true", help="replace an existing export in --out")

    serve = commands.add_parser("serve", help="run the annotation web app")
    serve.add_argument("--items", required=True, help="export directory (from `export --out`)")
    serve.add_argument("--db", help=f"SQLite answers file (default: <items>/{DB_FILE})")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8600)

    report = commands.add_parser("report", help="un-blind the answers and write report.md/.json/.png")
    report.add_argument("--items", required=True, help="export directory (from `export --out`)")
    report.add_argument("--db", help=f"SQLite answers file (default: <items>/{DB_FILE})")
    report.add_argument("--key", help="un-blinding key (default: <items>/key.json)")
    report.add_argument("--out", help="report directory (default: <items>/report)")
    return parser


def serve(items: str, db: Optional[str], host: str, port: int) -> None:
    import uvicorn

    from eval.human.app import create_app

    study = load_study(items)
    store = AnswerStore(db or study.directory / DB_FILE, study.items_sha256)
    token = os.environ.get(TOKEN_ENV) or None
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        log.warning("serving on %s without an access token: anyone who can reach it can sign in; set %s", host,
                    TOKEN_ENV)
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be between 1 and 65535, got {port}")
    log.info("%d items, answers in %s; open http://%s:%d/", len(study.items), store.path, host, port)
    uvicorn.run(create_app(study, store, token), host=host, port=port, log_level="info")


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "export":
        systems = [s.strip() for s in args.systems.split(",") if s.strip()] if args.systems else None
        export_study(args.eval_dir, args.out, n=args.n, seed=args.seed, systems=systems, force=args.force)
    elif args.command == "serve":
        serve(args.items, args.db, args.host, args.port)
    else:
        write_report(args.items, db=args.db, key=args.key, out=args.out)


if __name__ == "__main__":
    run_cli(main)
