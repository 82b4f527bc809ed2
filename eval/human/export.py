"""`export`: choose dialogues from an evaluation run and write blinded items plus the separate key.

The dialogues are a seeded random sample (select "random") or the n where the reward model and the held-out
judges disagree most about a chosen system's summary (select "disagreement"), shown in a seeded random order.
Each item shows the dialogue and the summaries of every chosen system in a random order of its own, under
slot letters; `key.json` records which system sits in which slot (and, for "disagreement", why each dialogue was
chosen). Everything is seeded, so the same `examples.jsonl`, systems, `--n`, `--seed` and `--select` give
byte-identical items.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from eval.human.items import (
    CRITERIA,
    CSV_FILE,
    FORMAT,
    ITEMS_FILE,
    KEY_FILE,
    MANIFEST_FILE,
    file_sha256,
    slot_names,
)
from train.atomic import write_text
from train.config import HumanConfig
from train.errors import ConfigError, DataError
from train.jsonl import read_jsonl

log = logging.getLogger("eval.human.export")
EXAMPLES_FILE = "examples.jsonl"
SELECT_MODES = ("random", "disagreement")
JUDGES_HINT = ("run eval.evaluate with eval.judges set, e.g. --eval.judges "
               "'[{name: toxigen, model_name_or_path: tomh/toxigen_roberta, toxic_label: LABEL_1}]'")


def read_eval_examples(path: Path) -> list[dict[str, Any]]:
    """Read eval's per-example JSONL ({"id", "dialogue", "human_summaries", "systems": {name: {"summary", ...}}})."""
    if path.is_dir():
        path = path / EXAMPLES_FILE
    if not path.is_file():
        raise DataError(f"evaluation examples not found at {path}: run `python -m eval.evaluate --config ...` first "
                        f"and pass its eval directory (e.g. runs/tiny/eval) as --human.eval_dir, or the run's --config")
    examples = []
    for number, record in read_jsonl(path, fix="re-run eval.evaluate"):
        systems = record.get("systems")
        if not (isinstance(record.get("dialogue"), str) and isinstance(systems, dict) and "id" in record):
            raise DataError(f"{path} line {number}: expected an object with 'id', 'dialogue' and 'systems' "
                            f"(the examples.jsonl written by eval.evaluate)")
        for name, output in systems.items():
            if not (isinstance(output, dict) and isinstance(output.get("summary"), str)):
                raise DataError(f"{path} line {number}: system {name!r} has no 'summary' string")
        examples.append(record)
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def choose_systems(examples: Sequence[dict[str, Any]], requested: Optional[Sequence[str]]) -> list[str]:
    """The systems to compare: the requested ones, or every system of the first example; all must be everywhere."""
    available = list(examples[0]["systems"])
    systems = list(requested) if requested else available
    if len(set(systems)) != len(systems):
        raise ConfigError(f"--systems lists a system twice: {','.join(systems)}")
    if len(systems) < 2:
        raise ConfigError(f"human evaluation compares at least 2 systems, got {systems}: "
                          f"pass --systems with two or more of {available}")
    for example in examples:
        missing = [s for s in systems if s not in example["systems"]]
        if missing:
            raise DataError(f"example {example['id']!r} has no summary from {missing} (it has "
                            f"{sorted(example['systems'])}): choose --systems present in every example")
    return systems


def _probability(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def disagreement_scores(examples: Sequence[dict[str, Any]], systems: Sequence[str]) -> list[dict[str, Any]]:
    """Per example, the largest |reward-model toxicity - held-out judge toxicity| over `systems` and the judges:
    {"score", "system", "judge", "reward_model", "judge_toxicity"}. Checks every example before returning."""
    names: Optional[list[str]] = None  # the judges, in the order of the first example (eval.judges' order)
    for example in examples:
        for system in systems:
            judges = example["systems"][system].get("judges") or {}
            if not isinstance(judges, dict):
                raise DataError(f"example {example['id']!r}, system {system!r}: 'judges' should map judge names to "
                                f"toxicity, got {type(judges).__name__}")
            if names is None:
                names = list(judges)
            elif set(judges) != set(names):
                raise DataError(f"example {example['id']!r}, system {system!r} has judges {sorted(judges)} but "
                                f"earlier summaries have {sorted(names)}: every summary needs the same held-out "
                                f"judges; re-run eval.evaluate")
    if not names:
        raise DataError(f"human.select disagreement needs held-out judge scores, but the evaluation has none: "
                        f"{JUDGES_HINT}")

    scores = []
    for example in examples:
        best: Optional[dict[str, Any]] = None
        for system in systems:
            output = example["systems"][system]
            toxicity = output.get("toxicity")
            if not _probability(toxicity):
                raise DataError(f"example {example['id']!r}, system {system!r}: the reward model's 'toxicity' should "
                                f"be a number in [0, 1], got {toxicity!r}; re-run eval.evaluate")
            for name in names:
                value = output["judges"][name]
                if not _probability(value):
                    raise DataError(f"example {example['id']!r}, system {system!r}: judge {name!r} gave {value!r}, "
                                    f"not a toxicity in [0, 1]; re-run eval.evaluate")
                score = abs(toxicity - value)
                # Strictly greater: on a tie the first system (in --systems order) and judge is named.
                if best is None or score > best["score"]:
                    best = {"score": score, "system": system, "judge": name, "reward_model": toxicity,
                            "judge_toxicity": value}
        assert best is not None  # choose_systems guarantees at least 2 systems
        scores.append(best)
    return scores


def export_study(
    eval_path: str | Path,
    out_dir: str | Path,
    n: int = HumanConfig.n,
    seed: int = HumanConfig.seed,
    systems: Optional[Sequence[str]] = None,
    force: bool = False,
    select: str = HumanConfig.select,
) -> Path:
    """Write items.jsonl, items.csv, manifest.json and key.json to `out_dir`; returns `out_dir`."""
    if n < 1:
        raise ConfigError(f"human.n must be at least 1, got {n}")
    if select not in SELECT_MODES:
        raise ConfigError(f"human.select must be one of {', '.join(SELECT_MODES)}, got {select!r}")
    out = Path(out_dir)
    if (out / ITEMS_FILE).exists() and not force:
        # Answers collected so far refer to these items; a new export would silently orphan them.
        raise ConfigError(f"{out / ITEMS_FILE} already exists (answers may refer to it): choose another "
                          f"--human.study_dir or pass --force to replace it")
    examples = read_eval_examples(Path(eval_path))
    chosen = choose_systems(examples, systems)
    rng = random.Random(seed)
    if n > len(examples):
        log.warning("asked for %d dialogues but the evaluation has %d: using all of them", n, len(examples))
    reasons: list[dict[str, Any]] = []  # per sampled example, why "disagreement" chose it
    if select == "random":
        sample = rng.sample(examples, min(n, len(examples)))
    else:
        scores = disagreement_scores(examples, chosen)
        # Highest first; ties in split (file) order, as sorted() is stable.
        ranked = sorted(range(len(examples)), key=lambda i: -scores[i]["score"])[:n]
        # A seeded order, so an item's position does not reveal its rank.
        shown = rng.sample(ranked, len(ranked))
        sample = [examples[i] for i in shown]
        reasons = [{"rank": ranked.index(i) + 1, **scores[i]} for i in shown]
        log.info("chose the %d dialogues with the largest reward-model/judge disagreement (%.3g to %.3g)",
                 len(ranked), scores[ranked[-1]]["score"], scores[ranked[0]]["score"])
    slots = slot_names(len(chosen))

    items, key_items = [], {}
    width = len(str(len(sample)))
    for index, example in enumerate(sample, start=1):
        item_id = f"item-{index:0{width}d}"
        order = list(chosen)
        rng.shuffle(order)  # a fresh order per item, so position says nothing about the system
        items.append({
            "item_id": item_id,
            "dialogue": example["dialogue"],
            "summaries": [{"slot": s, "text": example["systems"][name]["summary"]} for s, name in zip(slots, order)],
        })
        key_items[item_id] = {"example_id": example["id"], "slots": dict(zip(slots, order))}
        if select == "disagreement":
            key_items[item_id]["disagreement"] = reasons[index - 1]

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / ITEMS_FILE, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    digest = file_sha256(out / ITEMS_FILE)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = {"format": FORMAT, "items_sha256": digest, "n_items": len(items), "slots": slots,
                "criteria": list(CRITERIA), "seed": seed, "created_at": created}
    write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    # The selection is recorded in the key only: the manifest is shown to annotators, and knowing that the
    # dialogues were chosen for a toxicity disagreement could bias their ratings.
    key = {"format": FORMAT, "items_sha256": digest, "systems": chosen, "seed": seed,
           **({} if select == "random" else {"select": select}),  # a key without "select" is a random sample
           "source": str(eval_path), "created_at": created, "items": key_items}
    write_text(out / KEY_FILE, json.dumps(key, indent=2, ensure_ascii=False) + "\n")
    _write_csv(out / CSV_FILE, items, slots)
    log.info("wrote %d blinded items (%s) to %s; keep %s away from annotators", len(items), ", ".join(chosen), out,
             KEY_FILE)
    return out


def _write_csv(path: Path, items: list[dict[str, Any]], slots: list[str]) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["item_id", "dialogue", *[f"summary_{s}" for s in slots]])
    for item in items:
        writer.writerow([item["item_id"], item["dialogue"], *[s["text"] for s in item["summaries"]]])
    write_text(path, text.getvalue())
