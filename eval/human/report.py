"""`report`: un-blind the stored answers and summarise them per system.

Writes `report.json` (every number), `report.md` (tables) and `report.png` (win rates with 95% intervals and
flag rates). Per criterion: pairwise win rate (ties 0.5) with a Wilson interval, mean rank, a head-to-head
table, and Krippendorff's alpha (ordinal, over the ranks each system got on items with two or more annotators).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from eval.human.items import CRITERIA, FLAGS, KEY_FILE, Study, load_key, load_study
from eval.human.stats import head_to_head, krippendorff_alpha, mean_ranks, win_rates
from eval.human.store import Answer, AnswerStore, one_spelling
from train.atomic import write_text
from train.errors import DataError

log = logging.getLogger("eval.human.report")
DB_FILE = "answers.sqlite"


def unblind(answers: list[Answer], key: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """Answers with slots replaced by system names: [{annotator, item_id, ranks: {criterion: {system: rank}}, flags}]."""
    out = []
    for answer in answers:
        slots = key.get(answer.item_id)
        if slots is None:
            raise DataError(f"the answers database has an answer for item {answer.item_id!r}, which is not in this "
                            f"study: pass the --db that belongs to these items")
        unknown = {s for by_slot in answer.ranks.values() for s in by_slot} - set(slots)
        if unknown:
            raise DataError(f"answer of {answer.annotator!r} to {answer.item_id!r} ranks unknown slots {sorted(unknown)}")
        out.append({
            "annotator": answer.annotator,
            "item_id": answer.item_id,
            "ranks": {c: {slots[s]: r for s, r in by_slot.items()} for c, by_slot in answer.ranks.items()},
            "flags": {slots[s]: list(f) for s, f in answer.flags.items()},
        })
    return out


def compute_report(study: Study, key: dict[str, dict[str, str]], answers: list[Answer]) -> dict[str, Any]:
    """Every number of the report, as plain JSON-able data."""
    systems = sorted({system for slots in key.values() for system in slots.values()})
    judged = unblind(one_spelling(answers), key)  # "Carol" and "carol" are one annotator
    by_item = Counter(a["item_id"] for a in judged)
    result: dict[str, Any] = {
        "items": len(study.items),
        "items_answered": len(by_item),
        "items_with_2plus_annotators": sum(1 for c in by_item.values() if c >= 2),
        "answers": len(judged),
        "annotators": dict(sorted(Counter(a["annotator"] for a in judged).items())),
        "systems": systems,
        "criteria": {},
        "flags": {},
    }
    for criterion in CRITERIA:
        judgements = [a["ranks"][criterion] for a in judged if criterion in a["ranks"]]
        rates = win_rates(judgements, systems)
        pairs = head_to_head(judgements, systems)
        # Agreement: each (item, system) is a unit whose values are the ranks the annotators gave it.
        units: dict[tuple[str, str], list[float]] = {}
        for a in judged:
            if by_item[a["item_id"]] >= 2 and criterion in a["ranks"]:
                for system, rank in a["ranks"][criterion].items():
                    units.setdefault((a["item_id"], system), []).append(rank)
        result["criteria"][criterion] = {
            "judgements": len(judgements),
            "win_rate": {s: vars(w) for s, w in rates.items()},
            "mean_rank": mean_ranks(judgements, systems),
            "head_to_head": {f"{s} > {t}": vars(w) for (s, t), w in pairs.items()},
            "krippendorff_alpha_ordinal": krippendorff_alpha(units, "ordinal") if units else None,
        }
    for system in systems:
        shown = sum(1 for a in judged if any(system in r for r in a["ranks"].values()))
        counts = {flag: sum(1 for a in judged if flag in a["flags"].get(system, ())) for flag in FLAGS}
        result["flags"][system] = {"shown": shown, **counts}
    return result


def _json_safe(value: Any) -> Any:
    """NaN (no comparisons yet) becomes null, so report.json is standard JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _fmt(x: Optional[float], digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    systems = report["systems"]
    lines = [
        "# Human evaluation report",
        "",
        f"{report['answers']} answers from {len(report['annotators'])} annotators on {report['items_answered']} "
        f"of {report['items']} items ({report['items_with_2plus_annotators']} items with two or more annotators).",
        "",
        *(["> The items are the dialogues where the reward model and the held-out judges disagreed most "
           "(export --human.select disagreement), not a random sample: the figures describe those dialogues only.", ""]
          if report.get("selection") == "disagreement" else []),
        "| annotator | items answered |",
        "|---|---|",
        *[f"| {name} | {count} |" for name, count in report["annotators"].items()],
        "",
        "Win rate: the share of pairwise comparisons a system won (a tie counts half), with a 95% Wilson interval. "
        "Mean rank: 1 = best. Agreement: Krippendorff's alpha (ordinal) over the ranks each system received on items "
        "with two or more annotators (1 = perfect, 0 = chance).",
    ]
    for criterion, data in report["criteria"].items():
        lines += [
            "",
            f"## {criterion.capitalize()}",
            "",
            f"{data['judgements']} judgements; Krippendorff's alpha (ordinal): {_fmt(data['krippendorff_alpha_ordinal'])}",
            "",
            "| system | win rate | 95% CI | wins / comparisons | mean rank |",
            "|---|---|---|---|---|",
        ]
        for s in systems:
            w = data["win_rate"][s]
            lines.append(f"| {s} | {_fmt(w['rate'])} | [{_fmt(w['ci_low'])}, {_fmt(w['ci_high'])}] | "
                         f"{w['wins']:g} / {w['comparisons']} | {_fmt(data['mean_rank'][s])} |")
        lines += ["", "Head to head (row beats column):", "", "| | " + " | ".join(systems) + " |",
                  "|---" * (len(systems) + 1) + "|"]
        for s in systems:
            cells = ["—" if s == t else _fmt(data["head_to_head"][f"{s} > {t}"]["rate"]) for t in systems]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "## Flags", "", "| system | shown | " + " | ".join(FLAGS) + " |",
              "|---|---|" + "---|" * len(FLAGS)]
    for s in systems:
        f = report["flags"][s]
        lines.append(f"| {s} | {f['shown']} | " + " | ".join(str(f[flag]) for flag in FLAGS) + " |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = report["systems"]
    criteria = list(report["criteria"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    width = 0.8 / len(criteria)
    for i, criterion in enumerate(criteria):
        rates = report["criteria"][criterion]["win_rate"]
        x = [j + (i - (len(criteria) - 1) / 2) * width for j in range(len(systems))]
        y = [rates[s]["rate"] if rates[s]["comparisons"] else 0.0 for s in systems]
        err = [[max(0.0, rates[s]["rate"] - rates[s]["ci_low"]) if rates[s]["comparisons"] else 0 for s in systems],
               [max(0.0, rates[s]["ci_high"] - rates[s]["rate"]) if rates[s]["comparisons"] else 0 for s in systems]]
        axes[0].bar(x, y, width, yerr=err, capsize=4, label=criterion)
    axes[0].axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axes[0].set(xticks=range(len(systems)), xticklabels=systems, ylim=(0, 1), ylabel="win rate (95% CI)",
                title="Pairwise win rate")
    axes[0].legend()
    flags = list(FLAGS)
    width = 0.8 / len(flags)
    for i, flag in enumerate(flags):
        x = [j + (i - (len(flags) - 1) / 2) * width for j in range(len(systems))]
        shown = [report["flags"][s]["shown"] for s in systems]
        y = [report["flags"][s][flag] / n if n else 0.0 for s, n in zip(systems, shown)]
        axes[1].bar(x, y, width, label=flag)
    axes[1].set(xticks=range(len(systems)), xticklabels=systems, ylim=(0, 1), ylabel="share of times shown",
                title="Flagged summaries")
    axes[1].legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(items: str | Path, db: Optional[str | Path] = None, key: Optional[str | Path] = None,
                 out: Optional[str | Path] = None) -> dict[str, Any]:
    """Load the study, its key and answers; write report.{json,md,png} to `out`; return the numbers."""
    study = load_study(items)
    key_path = Path(key or study.directory / KEY_FILE)
    mapping = load_key(key_path, study)
    store = AnswerStore.read_only(db or study.directory / DB_FILE, study.items_sha256)  # never migrated or written
    answers = store.answers()
    if not answers:
        raise DataError(f"{store.path} holds no answers yet: annotate some items with `python -m eval.human serve` first")
    report = _json_safe(compute_report(study, mapping, answers))
    # How export chose the dialogues (load_key has checked the file): a selection is not a sample of the split.
    report["selection"] = json.loads(key_path.read_text(encoding="utf-8")).get("select", "random")
    out_dir = Path(out) if out else study.directory / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.json", json.dumps(report, indent=2) + "\n"), ("report.md", render_markdown(report))):
        write_text(out_dir / name, text)
    plot_report(report, out_dir / "report.png")
    log.info("wrote %s/report.md, report.json and report.png (%d answers)", out_dir, len(answers))
    return report
