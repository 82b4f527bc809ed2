"""Command line of the human evaluation: `python -m eval.human {export,serve,report}`.

    python -m eval.human export --config configs/tiny.yaml --human.n 50 --human.seed 0   # runs/tiny/eval -> runs/tiny/human
    python -m eval.human export --config configs/tiny.yaml --human.select disagreement   # reward model vs judges
    DETOX_HUMAN_TOKEN=secret python -m eval.human serve --config configs/tiny.yaml [--human.port 8600]
    python -m eval.human report --config configs/tiny.yaml [--human.db FILE] [--human.key FILE] [--human.report_dir DIR]

Settings are the `human` section of the config (train/config.py HumanConfig), set in a recipe or with
`--human.NAME VALUE`: eval_dir and study_dir default to the run's eval.out_dir (<output_dir>/eval) and
<output_dir>/human, so the recipe of a run finds its evaluation. Without --config, the defaults (or e.g. --human.eval_dir runs/tiny/eval
--human.study_dir runs/tiny/human) apply. `export --force` replaces an existing export.

The server binds to 127.0.0.1 unless human.host says otherwise; set DETOX_HUMAN_TOKEN to require an access token at
sign-in (do so whenever the server is reachable by others). Forms are accepted only from the origin a request's Host
header names, so a reverse proxy in front must pass the original Host (and X-Forwarded-Proto for https) through.
"""


from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import textwrap
from typing import Optional

from eval.human.export import export_study
from eval.human.items import load_study
from eval.human.report import DB_FILE, write_report
from eval.human.store import AnswerStore
from rewards.config import LOOPBACK_HOSTS, section_help
from train.cli import OVERRIDE_HELP, run_cli
from train.config import ExperimentConfig, HumanConfig, expand_output_dir, load_config

TOKEN_ENV = "DETOX_HUMAN_TOKEN"
SERVE_NOTES = f"""Set {TOKEN_ENV} to require an access token at sign-in (do so whenever others can reach the server).

A form's Origin (or Referer) header is compared with the scheme and Host header of the request it came in: a
reverse proxy in front must pass the original Host through (nginx: proxy_set_header Host $host), and, for https,
X-Forwarded-Proto (uvicorn trusts it from this machine only, or from the addresses in FORWARDED_ALLOW_IPS),
or every form is refused with 403.

Each annotator's name is claimed by their first sign-in with a personal code, shown on their pages; signing in
under that name again needs the code once they have signed out, or on another browser. When the answers database
holds names that answered before personal codes existed, serve gives each a code and writes them, once, to
<db stem>-personal-codes.txt next to the database (readable by you only): hand each annotator their own."""

log = logging.getLogger("eval.human")

COMMANDS = {
    "export": "sample dialogues and write blinded items + the separate key (human.eval_dir -> human.study_dir)",
    "serve": "run the annotation web app on the items in human.study_dir",
    "report": "un-blind the answers and write report.md/.json/.png (to human.report_dir)",
}
# Each command's flags of earlier versions and the keys that replaced them: each stops with one line naming its key.
FORMER_FLAGS = {
    "export": {"eval_dir": "human.eval_dir", "out": "human.study_dir", "n": "human.n", "seed": "human.seed",
               "systems": "human.systems"},
    "serve": {"items": "human.study_dir", "db": "human.db", "host": "human.host", "port": "human.port"},
    "report": {"items": "human.study_dir", "db": "human.db", "key": "human.key", "out": "human.report_dir"},
}


def build_parser() -> argparse.ArgumentParser:
    epilog = ("Settings: the human section, from --config FILE and --human.NAME VALUE overrides\n"
              "(\"{output_dir}\" expands to the config's output_dir):\n"
              f"{section_help('human', HumanConfig())}\n\n{textwrap.fill(OVERRIDE_HELP, 100)}")
    parser = argparse.ArgumentParser(prog="python -m eval.human", description=__doc__.splitlines()[0], epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        description = f"{help_text}\n\n{SERVE_NOTES}" if name == "serve" else help_text
        sub = commands.add_parser(name, help=help_text, description=description, epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
        sub.add_argument("--config", help="YAML recipe (its output_dir and human section); default: the defaults")
        if name == "export":
            sub.add_argument("--force", action="store_true", help="replace an existing export in human.study_dir")
    return parser


def resolve_paths(cfg: ExperimentConfig) -> HumanConfig:
    """The human section with "{output_dir}" expanded in its paths and eval_dir defaulting to eval.out_dir."""
    h = cfg.human

    def expand(path: Optional[str]) -> Optional[str]:
        return None if path is None else expand_output_dir(path, cfg.output_dir)

    eval_dir = h.eval_dir if h.eval_dir is not None else cfg.eval.out_dir
    return dataclasses.replace(h, eval_dir=expand(eval_dir), study_dir=expand(h.study_dir), db=expand(h.db),
                               key=expand(h.key), report_dir=expand(h.report_dir))


def serve(items: str, db: Optional[str], host: str, port: int) -> None:
    import uvicorn

    from eval.human.app import create_app

    study = load_study(items)
    store = AnswerStore(db or study.directory / DB_FILE, study.items_sha256)
    token = os.environ.get(TOKEN_ENV) or None
    if host not in LOOPBACK_HOSTS and token is None:
        log.warning("serving on %s without an access token: anyone who can reach it can sign in; set %s", host,
                    TOKEN_ENV)
    log.info("%d items, answers in %s; open http://%s:%d/", len(study.items), store.path, host, port)
    uvicorn.run(create_app(study, store, token), host=host, port=port, log_level="info")


def main(argv: Optional[list[str]] = None) -> None:
    args, overrides = build_parser().parse_known_args(argv)
    h = resolve_paths(load_config(args.config, overrides, renamed=FORMER_FLAGS[args.command]))
    if args.command == "export":
        export_study(h.eval_dir, h.study_dir, n=h.n, seed=h.seed, systems=h.systems, force=args.force,
                     select=h.select)
    elif args.command == "serve":
        serve(h.study_dir, h.db, h.host, h.port)
    else:
        write_report(h.study_dir, db=h.db, key=h.key, out=h.report_dir)


if __name__ == "__main__":
    run_cli(main)
