"""Human evaluation: blinded ranking of summaries by annotators, then an un-blinded report.

Three steps, each a subcommand of `python -m eval.human`:

- `export`: sample dialogues from an evaluation run's `examples.jsonl` and write blinded items
  (`items.jsonl`, `items.csv` for other annotation tools), a `manifest.json` (hash of the items) and the
  separate un-blinding `key.json` (item → slot → system).
- `serve`: a small web app where annotators sign in with a name and rank the summaries of each item on
  readability and coherence, flagging toxic or unusable ones; answers go to SQLite.
- `report`: un-blinds the answers and writes win rates with 95% Wilson intervals, mean ranks, flag counts and
  inter-annotator agreement (Krippendorff's alpha, ordinal) as `report.md`, `report.json` and `report.png`.
"""

from eval.human.items import CRITERIA, FLAGS, Item, Study, load_key, load_study

__all__ = ["CRITERIA", "FLAGS", "Item", "Study", "load_key", "load_study"]
