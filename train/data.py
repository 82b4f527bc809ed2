"""DialogSum loading and the prompt datasets for SFT, PPO and evaluation.

`load_dialogsum(path)` reads DialogSum from any of three sources into one schema (splits `train`,
`validation`, `test`; columns `id`, `dialogue`, `summary`, `human_summaries`, `topic`):

* a local directory in the original cylnlp JSONL layout (`dialogsum.{train,dev,test}.jsonl`; the test
  file has `summary1..3`/`topic1..3`),
* a local directory in the Hugging Face CSV layout (`{train,validation,test}.csv`; the test split repeats
  each dialogue once per human summary, so rows of the same dialogue are grouped back into one example),
* a hub id such as `knkarthick/dialogsum` (the CSV layout, loaded with `datasets.load_dataset`).

Rows whose dialogue is empty or not a string, or that have no human summary, are dropped, counted
and logged; `read_dialogsum` returns those counts in a `LoadReport`. A split with no examples at all (an
empty file, a header without rows, every row dropped) is a DataError naming the file.

The builders reproduce the original notebook: keep dialogues with 200 < len <= 1000 characters, wrap
them in the "Summarize the following conversation." prompt, tokenize, and split 80/20 without
shuffling, with the same rounding as `Dataset.train_test_split(test_size=0.2, shuffle=False)`.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import datasets
from datasets import Dataset, DatasetDict, Features, List, Value

from rewards.hub import hub_access
from rewards.sources import is_hub_id
from train.config import DataConfig
from train.errors import DataError
from train.jsonl import not_utf8_error, read_jsonl

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
JSONL_FILES = {"train": "dialogsum.train.jsonl", "validation": "dialogsum.dev.jsonl", "test": "dialogsum.test.jsonl"}
CSV_FILES = {"train": "train.csv", "validation": "validation.csv", "test": "test.csv"}
LOCAL_HINT = "pass a local directory, e.g. --data.path ../shared/data/dialogsum"
# csv's default field limit (131072 characters) would reject a long but legitimate dialogue; the length filter
# of the prompt builders, not the parser, decides what is too long. 2**31 - 1 fits a C long everywhere.
CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)

FEATURES = Features(
    id=Value("string"),
    dialogue=Value("string"),
    summary=Value("string"),
    human_summaries=List(Value("string")),
    topic=Value("string"),
)
_REPEAT_SUFFIX = re.compile(r"_\d+$")  # HF test ids: test_<i>_<k>, k = summary number


@dataclass
class SplitReport:
    rows_read: int = 0
    dropped_dialogue: int = 0  # empty, whitespace-only or non-string dialogue
    dropped_summary: int = 0  # no non-empty string human summary
    examples: int = 0  # after dropping, grouping and max_examples


@dataclass
class LoadReport:
    source: str  # "jsonl", "csv" or "hub"
    splits: dict[str, SplitReport] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Loading


def load_dialogsum(
    path: str, max_examples: int | None = None, splits: Sequence[str] = SPLITS
) -> DatasetDict:
    """DialogSum as a DatasetDict with `splits`; each split capped to its first `max_examples` examples."""
    return read_dialogsum(path, max_examples, splits)[0]


def read_dialogsum(
    path: str, max_examples: int | None = None, splits: Sequence[str] = SPLITS
) -> tuple[DatasetDict, LoadReport]:
    """Like `load_dialogsum`, also returning what was read and dropped per split."""
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DataError(f"unknown DialogSum split(s) {unknown}; choose from {', '.join(SPLITS)}")
    local = Path(path)
    if local.is_dir():
        source, tables = _read_local_dir(local, splits)
    elif local.exists():
        raise DataError(f"data path {path} is a file; pass the directory that holds the DialogSum files")
    elif is_hub_id(path, require_owner=True):
        source, tables = "hub", _read_hub(path, splits)
    else:
        raise DataError(f"data directory not found: {path} (resolved to {local.resolve()}); {LOCAL_HINT}")

    report = LoadReport(source=source)
    out = DatasetDict()
    for split in splits:
        where, records = tables[split]
        examples, split_report = _normalise(records, where, group_repeats=(source != "jsonl" and split == "test"))
        if not examples:  # checked here, before the length filter, so the message names the file, not the filter
            raise DataError(_no_examples_message(path, split, where, split_report))
        if max_examples is not None:
            examples = examples[:max_examples]
        split_report.examples = len(examples)
        report.splits[split] = split_report
        dropped = split_report.dropped_dialogue + split_report.dropped_summary
        if dropped:
            logger.warning(
                "dropped %d of %d rows in %s: %d with an empty or non-string dialogue, %d without a human summary",
                dropped, split_report.rows_read, split, split_report.dropped_dialogue, split_report.dropped_summary,
            )
        columns = {name: [ex[name] for ex in examples] for name in FEATURES}
        out[split] = Dataset.from_dict(columns, features=FEATURES, split=split)
    return out, report


# A table is (description for error messages, iterator of (row number, record dict)).
Table = tuple[str, Iterable[tuple[int, dict[str, Any]]]]


def _read_local_dir(directory: Path, splits: Sequence[str]) -> tuple[str, dict[str, Table]]:
    for source, files, reader in (("jsonl", JSONL_FILES, read_jsonl), ("csv", CSV_FILES, _read_csv)):
        if all((directory / files[s]).is_file() for s in splits):
            return source, {s: (str(directory / files[s]), reader(directory / files[s])) for s in splits}
    found = sorted(p.name for p in directory.iterdir())
    raise DataError(
        f"{directory} is not a DialogSum directory: expected either the JSONL layout "
        f"({', '.join(JSONL_FILES[s] for s in splits)}) or the Hugging Face CSV layout "
        f"({', '.join(CSV_FILES[s] for s in splits)}); found: {', '.join(found) or 'nothing'}"
    )



def _read_csv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    # Raised, never lowered: the limit is process-wide and another reader may have set it higher.
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    # utf-8-sig: spreadsheet programs write a byte-order mark that would otherwise become part of the first column name.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            for record in reader:
                yield reader.line_num, record
        except csv.Error as e:
            raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None
        except UnicodeDecodeError:
            raise not_utf8_error(path) from None


def _no_examples_message(path: str, split: str, where: str, report: SplitReport) -> str:
    head = f"the {split} split of {path} has no examples: "
    if report.rows_read:
        return head + (
            f"all {report.rows_read} rows of {where} were dropped ({report.dropped_dialogue} with an empty or "
            f"non-string dialogue, {report.dropped_summary} without a human summary); check that its dialogue and "
            "summary columns hold text"
        )
    file = Path(where)
    if not file.is_file():
        why = f"{where} has no rows"
    elif file.stat().st_size == 0:
        why = f"{where} is empty (0 bytes)"
    elif file.suffix == ".csv":
        why = f"{where} has a header line but no rows"
    else:
        why = f"{where} has only blank lines"
    return head + why + "; copy the DialogSum files again, or point --data.path at a complete copy"


def _datasets_cache_dir(repo_id: str) -> Path:
    """Where `datasets` keeps a hub dataset it has prepared once (it can load it from there offline)."""
    from datasets.naming import camelcase_to_snakecase

    *owner, name = repo_id.split("/")
    return Path(datasets.config.HF_DATASETS_CACHE) / "___".join([*owner, camelcase_to_snakecase(name)])


def _read_hub(repo_id: str, splits: Sequence[str]) -> dict[str, Table]:
    fix = "pass it with --data.path DIR (the CSV layout)"
    try:
        with hub_access(repo_id, "dataset", fix, DataError, "dataset", [_datasets_cache_dir(repo_id)]):
            loaded = datasets.load_dataset(repo_id)
    except (OSError, ValueError) as e:  # ConnectionError, DatasetNotFoundError, missing cache, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"could not load dataset '{repo_id}' from the Hugging Face hub ({reason}) and there is no local "
            f"directory of that name; offline? {LOCAL_HINT}"
        ) from None
    missing = [s for s in splits if s not in loaded]
    if missing:
        raise DataError(f"hub dataset '{repo_id}' has no split(s) {missing}; it has {list(loaded)}")
    return {s: (f"hub dataset '{repo_id}' split {s}", enumerate(loaded[s].to_list(), start=1)) for s in splits}


def _normalise(records: Iterable[tuple[int, dict[str, Any]]], where: str, group_repeats: bool):
    """Map raw records to the common schema, dropping unusable rows.

    With `group_repeats`, rows that share a dialogue become one example with all their human summaries.
    """
    report = SplitReport()
    examples: list[dict[str, Any]] = []
    by_dialogue: dict[str, dict[str, Any]] = {}
    grouped: set[str] = set()
    for row_no, record in records:
        report.rows_read += 1
        _check_columns(record, where, row_no)
        dialogue = record["dialogue"]
        if not isinstance(dialogue, str) or not dialogue.strip():
            report.dropped_dialogue += 1
            continue
        summaries, topics = _human_summaries(record)
        if not summaries:
            report.dropped_summary += 1
            continue
        example = {
            "id": str(record["id"] if "id" in record else record["fname"]),
            "dialogue": dialogue,
            "summary": summaries[0],
            "human_summaries": summaries,
            "topic": topics[0] if topics else "",
        }
        if group_repeats and dialogue in by_dialogue:
            first = by_dialogue[dialogue]
            first["human_summaries"].extend(summaries)
            if not first["topic"] and topics:
                first["topic"] = topics[0]
            grouped.add(dialogue)
            continue
        by_dialogue[dialogue] = example
        examples.append(example)
    for dialogue in grouped:  # ids test_<i>_<k> -> test_<i>, only where rows were actually merged
        by_dialogue[dialogue]["id"] = _REPEAT_SUFFIX.sub("", by_dialogue[dialogue]["id"])
    return examples, report


def _check_columns(record: dict[str, Any], where: str, row_no: int) -> None:
    missing = []
    if "id" not in record and "fname" not in record:
        missing.append("id (fname in the JSONL layout)")
    if "dialogue" not in record:
        missing.append("dialogue")
    if "summary" not in record and "summary1" not in record:
        missing.append("summary (summary1.. in the JSONL test file)")
    if missing:
        raise DataError(
            f"{where}, row {row_no}: missing column(s) {', '.join(missing)}; "
            f"columns present: {', '.join(map(str, record)) or 'none'}"
        )


def _human_summaries(record: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Non-empty human summaries (summary, or summary1..N in the original test file) and their topics."""
    if "summary" in record:
        pairs = [(record["summary"], record.get("topic"))]
    else:
        pairs, k = [], 1
        while f"summary{k}" in record:
            pairs.append((record[f"summary{k}"], record.get(f"topic{k}")))
            k += 1
    summaries = [s for s, _ in pairs if isinstance(s, str) and s.strip()]
    topics = [t for s, t in pairs if isinstance(s, str) and s.strip() and isinstance(t, str) and t.strip()]
    return summaries, topics


# ----------------------------------------------------------------------------------------------------
# Prompts and model inputs


def filter_by_length(ds: Dataset, min_chars: int, max_chars: int) -> Dataset:
    """Keep examples with min_chars < len(dialogue) <= max_chars (the original notebook's filter)."""
    return ds.filter(
        lambda dialogues: [min_chars < len(d) <= max_chars for d in dialogues],
        input_columns="dialogue",
        batched=True,
    )


def format_prompt(dialogue: str, template: str) -> str:
    # str.replace, not str.format: a template (or dialogue) may contain other braces.
    return template.replace("{dialogue}", dialogue)


def split_sizes(n: int, train_fraction: float) -> tuple[int, int]:
    """(n_train, n_test) exactly as `Dataset.train_test_split(test_size=1 - train_fraction)` computes them."""
    test_size = round(1.0 - train_fraction, 10)  # 1 - 0.8 is 0.19999999999999996; the original notebook passed 0.2
    n_test = math.ceil(test_size * n)
    return n - n_test, n_test


def build_ppo_datasets(cfg: DataConfig, tokenizer) -> DatasetDict:
    """PPO prompts: the filtered train split, tokenized, split into `train`/`test` without shuffling.

    Columns: `id`, `dialogue`, `human_summaries`, `input_ids` (prompt, truncated to max_prompt_tokens) and
    `query` (= tokenizer.decode(input_ids), special tokens included, as in the original notebook).
    `cfg.max_examples` caps the filtered set before splitting.
    """
    ds = _filtered_split(cfg, "train")
    n_train, n_test = split_sizes(len(ds), cfg.train_fraction)
    if n_train == 0 or n_test == 0:
        raise DataError(
            f"{len(ds)} train dialogues are left after the length filter "
            f"({cfg.min_dialogue_chars} < chars <= {cfg.max_dialogue_chars}): too few to split "
            f"with data.train_fraction {cfg.train_fraction}; raise data.max_examples or widen the filter"
        )

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        prompts = [format_prompt(d, cfg.prompt_template) for d in batch["dialogue"]]
        input_ids = tokenizer(prompts, truncation=True, max_length=cfg.max_prompt_tokens)["input_ids"]
        return {"input_ids": input_ids, "query": [tokenizer.decode(ids) for ids in input_ids]}

    ds = ds.map(tokenize, batched=True, remove_columns=["summary", "topic"], desc="Tokenizing PPO prompts")
    return DatasetDict(train=ds.select(range(n_train)), test=ds.select(range(n_train, n_train + n_test)))


def build_sft_datasets(cfg: DataConfig, tokenizer) -> DatasetDict:
    """LoRA SFT examples from the filtered train and validation splits: `input_ids`, `attention_mask`
    (prompt, truncated to max_prompt_tokens) and `labels` (first human summary, truncated to max_summary_tokens).
    Unpadded; the collator pads per batch. `cfg.max_examples` caps each split after filtering.
    """

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        prompts = [format_prompt(d, cfg.prompt_template) for d in batch["dialogue"]]
        features = tokenizer(prompts, truncation=True, max_length=cfg.max_prompt_tokens)
        labels = tokenizer(text_target=batch["summary"], truncation=True, max_length=cfg.max_summary_tokens)
        return {
            "input_ids": features["input_ids"],
            "attention_mask": features["attention_mask"],
            "labels": labels["input_ids"],
        }

    out = DatasetDict()
    for split in ("train", "validation"):
        ds = _filtered_split(cfg, split)
        out[split] = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing SFT {split}")
    return out


def build_eval_dataset(cfg: DataConfig, split: str, max_examples: int | None = None) -> Dataset:
    """Examples for ROUGE/toxicity evaluation: `id`, `dialogue`, `prompt`, `human_summaries` (all of them).

    No length filter: the original notebook's ROUGE evaluation used the whole test split. `max_examples`
    (default: cfg.max_examples) keeps the first N examples.
    """
    cap = max_examples if max_examples is not None else cfg.max_examples
    ds = load_dialogsum(cfg.path, max_examples=cap, splits=[split])[split]
    if len(ds) == 0:
        raise DataError(f"the {split} split of {cfg.path} has no examples: check data.path and eval.split")
    return ds.map(
        lambda batch: {"prompt": [format_prompt(d, cfg.prompt_template) for d in batch["dialogue"]]},
        batched=True,
        remove_columns=["summary", "topic"],
    ).select_columns(["id", "dialogue", "prompt", "human_summaries"])


def _filtered_split(cfg: DataConfig, split: str) -> Dataset:
    ds = load_dialogsum(cfg.path, splits=[split])[split]
    ds = filter_by_length(ds, cfg.min_dialogue_chars, cfg.max_dialogue_chars)
    if cfg.max_examples is not None:
        ds = ds.select(range(min(cfg.max_examples, len(ds))))
    return ds
