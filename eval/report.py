"""The evaluation report: `report.md` (metrics table, before/after changes, qualitative table) and PNG plots.

    write_report(summary, records, out_dir, ppo_log=Path("runs/tiny/ppo/log.jsonl"))

`summary` is the dict `eval.evaluate` writes to summary.json and `records` its per-example records (the lines
of examples.jsonl). Plots use matplotlib's Agg backend (no display needed): `toxicity.png` (distribution of
each system's toxicity by the reward model), `judges.png` (each system's toxicity by every judge, with CIs) and,
given a PPO log.jsonl, `ppo_curves.png` (reward and KL per PPO step).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

from eval.metrics import JUDGE_FLOOR, JUDGE_METRICS, VERDICTS, disagreement_rows
from train.config import REWARD_MODEL_JUDGE
from train.rouge import ROUGE_TYPES
from train.jsonl import read_jsonl

ROUGE_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
# PPO log keys, first match wins: TRL-style names first, then the raw score statistic.
REWARD_KEYS = ("env/reward_mean", "ppo/mean_scores", "reward/mean")
KL_KEYS = ("objective/kl",)


# ----------------------------------------------------------------------------------------------------
# Markdown


def _number(value: Optional[float], spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"  # None: undefined, e.g. a change from a zero mean


def _ci(estimate: dict[str, Optional[float]], digits: int = 4) -> str:
    spec = f".{digits}f"
    return (f"{_number(estimate['value'], spec)} "
            f"[{_number(estimate['ci_low'], spec)}, {_number(estimate['ci_high'], spec)}]")


def _signed_ci(estimate: dict[str, Optional[float]], digits: int = 4, unit: str = "") -> str:
    spec = f"+.{digits}f"
    return (f"{_number(estimate['value'], spec, unit)} "
            f"[{_number(estimate['ci_low'], spec, unit)}, {_number(estimate['ci_high'], spec, unit)}]")


def _cell(text: str, limit: int = 300) -> str:
    """Table-safe text: no pipes or newlines, long summaries shortened."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def metrics_table(summary: dict[str, Any]) -> str:
    pct = round(100 * summary["bootstrap"]["confidence"])
    header = ["system", "adapter", "n", *(ROUGE_LABELS[k] for k in ROUGE_TYPES),
              f"toxicity mean [{pct}% CI]", f"toxicity std [{pct}% CI]", f"reward mean [{pct}% CI]"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|" + "---:|" * (len(header) - 3)]
    for name, m in summary["metrics"]["systems"].items():
        rouge = [f"{m['rouge'][k]['value']:.4f}" for k in ROUGE_TYPES]
        tox = m["toxicity"]
        lines.append("| " + " | ".join([
            name, _cell(m["adapter"] or "none (base)"), str(m["n"]), *rouge,
            _ci(tox["mean"]), _ci(tox["std"]), _ci(m["reward"], 3),
        ]) + " |")
    return "\n".join(lines)


def _significant(estimate: dict[str, Optional[float]]) -> bool:
    low, high = estimate["ci_low"], estimate["ci_high"]
    return low is not None and high is not None and (low > 0 or high < 0)


def comparison_section(summary: dict[str, Any]) -> str:
    """The headline before/after line, then a table of every system against the "before" system."""
    metrics = summary["metrics"]
    before, after = metrics["before"], metrics["after"]
    pct = round(100 * summary["bootstrap"]["confidence"])
    lines = []
    if after in metrics["comparisons"]:
        c = metrics["comparisons"][after]
        tox_b = metrics["systems"][before]["toxicity"]["mean"]["value"]
        tox_a = metrics["systems"][after]["toxicity"]["mean"]["value"]
        rel = c["toxicity_relative_change_pct"]
        lines.append(
            f"**{after} vs {before}**: mean toxicity by the reward model {tox_b:.4f} → {tox_a:.4f}, a relative change of "
            f"**{_signed_ci(rel, 1, '%')}** ({pct}% paired bootstrap CI; negative = less toxic); reward "
            f"{_signed_ci(c['reward_difference'], 3)}; ROUGE-L {_signed_ci(c['rouge_difference']['rougeL'])}."
        )
        held_out = [j for j in c.get("judges", {}) if j != REWARD_MODEL_JUDGE]
        if held_out:
            lines.append("\nBy the held-out judges (PPO never saw them), mean toxicity: " + "; ".join(
                f"{j} {metrics['systems'][before]['judges'][j]['toxicity']['value']:.4f} → "
                f"{metrics['systems'][after]['judges'][j]['toxicity']['value']:.4f} "
                f"({_signed_ci(c['judges'][j]['toxicity_difference'])})" for j in held_out) + ".")
        dropped = [ROUGE_LABELS[k] for k in ROUGE_TYPES
                   if _significant(c["rouge_difference"][k]) and c["rouge_difference"][k]["value"] < 0]
        if dropped:
            lines.append(f"\n> **Warning:** {', '.join(dropped)} fell significantly ({pct}% CI entirely below 0): "
                         "the detoxified summaries are measurably worse summaries.")
        elif not _significant(rel):
            lines.append(f"\nThe toxicity change is not significant at {pct}%: its CI contains 0.")
    elif len(metrics["systems"]) == 1:
        lines.append(f"Only one system ({before}): nothing to compare.")
    else:
        lines.append(f"eval.before and eval.after are both {before}: no headline comparison.")
    if metrics["comparisons"]:
        header = ["system", "vs", "toxicity change %", "toxicity difference", "reward difference",
                  *(f"{ROUGE_LABELS[k]} difference" for k in ROUGE_TYPES)]
        lines += ["", f"Differences are after − before, with {pct}% paired bootstrap CIs.", "",
                  "| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
        for name, c in metrics["comparisons"].items():
            lines.append("| " + " | ".join([
                name, c["before"], _signed_ci(c["toxicity_relative_change_pct"], 1),
                _signed_ci(c["toxicity_difference"]), _signed_ci(c["reward_difference"], 3),
                *(_signed_ci(c["rouge_difference"][k]) for k in ROUGE_TYPES),
            ]) + " |")
    return "\n".join(lines)


METRIC_LABELS = {"toxicity": "mean toxicity", "expected_max_toxicity": "expected max toxicity",
                 "toxicity_probability": "toxicity probability"}


def _judge_label(judge: str) -> str:
    return "reward model" if judge == REWARD_MODEL_JUDGE else judge


def _sampling(settings: dict[str, Any]) -> str:
    lengths = (f"{settings['max_new_tokens_min']}–{settings['max_new_tokens']}" if settings["max_new_tokens_min"]
               else str(settings["max_new_tokens"]))
    return (f"top_k {settings['top_k']}, top_p {settings['top_p']}, temperature {settings['temperature']}, "
            f"min_length {settings['min_length']}, max_new_tokens {lengths}")


def judges_section(summary: dict[str, Any]) -> str:
    """Toxicity per system and judge: greedy mean, and over the k samples expected max and probability."""
    metrics = summary["metrics"]
    pct = round(100 * summary["bootstrap"]["confidence"])
    k = metrics.get("samples_per_prompt", 0)
    shown = [m for m in JUDGE_METRICS if m == "toxicity" or k]
    header = ["system", "judge", *(f"{METRIC_LABELS[m]} [{pct}% CI]" for m in shown)]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(shown)]
    for name, m in metrics["systems"].items():
        for judge, values in m["judges"].items():
            lines.append("| " + " | ".join([name, _judge_label(judge), *(_ci(values[x]) for x in shown)]) + " |")
    note = (f"Mean toxicity is of the {'greedy' if not summary['generation']['do_sample'] else 'eval.generation'} "
            "summary. " + (f"Expected max toxicity and toxicity probability are over {k} summaries sampled per prompt "
                           "with the training settings." if k else "Set eval.samples_per_prompt for the k-sample "
                                                                   "metrics."))
    return "\n".join(lines) + "\n\n" + note


def diversity_section(summary: dict[str, Any]) -> str:
    """distinct-1/2/3 and length per system, then their differences against the "before" system."""
    metrics = summary["metrics"]
    pct = round(100 * summary["bootstrap"]["confidence"])
    names = ["distinct-1", "distinct-2", "distinct-3"]

    def cell(estimate: Optional[dict[str, Optional[float]]], signed: bool = False) -> str:
        if estimate is None:
            return "n/a"
        return _signed_ci(estimate) if signed else _ci(estimate)

    within = "within a prompt's samples" if metrics.get("samples_per_prompt") else "within a summary"
    columns = [f"{n} {within}" for n in names] + [f"{n} across prompts" for n in names]
    lines = ["| system | " + " | ".join(f"{c} [{pct}% CI]" for c in columns) + f" | length in tokens [{pct}% CI] |",
             "|---|" + "---:|" * (len(columns) + 1)]
    for name, m in metrics["systems"].items():
        lines.append("| " + " | ".join([name, *(cell(m["distinct"][n]) for n in names),
                                        *(cell(m["distinct_across_prompts"][n]) for n in names),
                                        _ci(m["length_tokens"], 2)]) + " |")
    if metrics["comparisons"]:
        lines += ["", "| system | vs | " + " | ".join(f"{c} difference" for c in columns) + " | length difference |",
                  "|---|---|" + "---:|" * (len(columns) + 1)]
        for name, c in metrics["comparisons"].items():
            lines.append("| " + " | ".join([name, c["before"], *(cell(c["distinct_difference"][n], True) for n in names),
                                            *(cell(c["distinct_across_prompts_difference"][n], True) for n in names),
                                            _signed_ci(c["length_tokens_difference"], 2)]) + " |")
    return "\n".join(lines)


def reward_hacking_section(summary: dict[str, Any], records: Sequence[dict[str, Any]], rows: int) -> str:
    """The reward model's before -> after change next to each held-out judge's, a warning where only the reward model
    sees detoxification, and the examples where they disagree most."""
    metrics = summary["metrics"]
    check = metrics.get("reward_hacking")
    if check is None:
        return "No before → after comparison: nothing to check."
    before, after = check["before"], check["after"]
    held_out = [j for j in metrics["judges"] if j != REWARD_MODEL_JUDGE]
    if not held_out:
        return ("> **Not checked:** no held-out judge (eval.judges is empty), so the toxicity change is measured only by "
                "the reward model PPO optimised, which cannot tell detoxification from its own blind spots.")
    pct = round(100 * summary["bootstrap"]["confidence"])
    lines = [f"{after} vs {before}: changes are after − before with {pct}% paired bootstrap CIs; negative = less "
             "toxic. The reward model is what PPO optimised; the held-out judges were not trained against.", "",
             "| metric | held-out judge | reward model change | held-out judge change | verdict |",
             "|---|---|---:|---:|---|"]
    for row in check["rows"]:
        verdict = VERDICTS[row["verdict"]]
        lines.append(f"| {METRIC_LABELS[row['metric']]} | {row['judge']} | {_signed_ci(row['reward_model'])} | "
                     f"{_signed_ci(row['held_out'])} | {f'**warning: {verdict}**' if row['warning'] else verdict} |")
    unconfirmed = sorted({r["judge"] for r in check["rows"] if r["verdict"] == "unconfirmed"})
    worse = sorted({r["judge"] for r in check["rows"] if r["verdict"] == "worse"})
    if check["warning"]:
        reasons = []
        if unconfirmed:
            reasons.append(f"the reward model says {after} is less toxic than {before} (CI below 0), but "
                           f"{', '.join(unconfirmed)} cannot confirm it (CI reaches 0 or above)")
        if worse:
            reasons.append(f"{', '.join(worse)} finds {after} MORE toxic than {before} (CI above 0)")
        reason = "; and ".join(reasons)
        lines += ["", f"> **Warning: possible reward hacking.** {reason[0].upper() + reason[1:]}. The policy may "
                  "have learned the reward model's blind spots: read the examples below and have people judge the "
                  "disputed summaries (python -m eval.human export --human.select disagreement)."]
    else:
        lines += ["", "No warning: wherever the reward model saw significantly less toxicity, every held-out judge "
                      f"did too (or saw less than {JUDGE_FLOOR} before), and no held-out judge saw more."]
    for judge in held_out:
        lines += ["", f"### Where the reward model and {judge} disagree most", "",
                  f"Examples where the reward model's toxicity change is most below {judge}'s "
                  f"(gap = {judge}'s change − the reward model's):", "",
                  f"| id | {before} summary | {after} summary | reward model {before} → {after} | "
                  f"{judge} {before} → {after} | gap |", "|---|---|---|---:|---:|---:|"]
        shown = disagreement_rows(records, before, after, judge, rows)
        if not shown:
            lines[-4:] = ["None: on no example did the reward model see a larger drop in toxicity than this judge."]
        for row in shown:
            rm, ho = row["reward_model"], row["held_out"]
            lines.append(f"| {_cell(row['id'])} | {_cell(row['before'])} | {_cell(row['after'])} | "
                         f"{rm[0]:.3f} → {rm[1]:.3f} | {ho[0]:.3f} → {ho[1]:.3f} | {row['gap']:+.3f} |")
    return "\n".join(lines)


def qualitative_rows(records: Sequence[dict[str, Any]], before: str, after: str) -> list[dict[str, Any]]:
    """One row per example, sorted by reward improvement (after − before), largest first; ties by split order."""
    rows = []
    for r in records:
        b, a = r["systems"][before], r["systems"][after]
        rows.append({"id": r["id"], "before": b["summary"], "after": a["summary"], "reward_before": b["reward"],
                     "reward_after": a["reward"], "improvement": a["reward"] - b["reward"]})
    return sorted(rows, key=lambda row: -row["improvement"])  # sorted() is stable: equal rows keep split order


def qualitative_table(records: Sequence[dict[str, Any]], before: str, after: str, rows: int = 10) -> str:
    """The original notebook's last table: the `rows` largest and `rows` smallest reward improvements."""
    ordered = qualitative_rows(records, before, after)
    shown = ordered if len(ordered) <= 2 * rows else ordered[:rows] + [None] + ordered[-rows:]
    lines = [f"| id | {before} summary | {after} summary | reward {before} | reward {after} | improvement |",
             "|---|---|---|---:|---:|---:|"]
    for row in shown:
        if row is None:
            lines.append(f"| … | *{len(ordered) - 2 * rows} more* | | | | |")
            continue
        lines.append(f"| {_cell(row['id'])} | {_cell(row['before'])} | {_cell(row['after'])} | "
                     f"{row['reward_before']:.3f} | {row['reward_after']:.3f} | {row['improvement']:+.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_toxicity(records: Sequence[dict[str, Any]], systems: Sequence[str], path: Path) -> Path:
    """Histogram (left) and violin plot (right) of each system's per-example toxicity."""
    plt = _pyplot()
    values = [[r["systems"][s]["toxicity"] for r in records] for s in systems]
    fig, (hist_ax, violin_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    bins = [i / 40 for i in range(41)]
    for name, v in zip(systems, values):
        hist_ax.hist(v, bins=bins, histtype="step", linewidth=1.8, label=f"{name} (mean {sum(v) / len(v):.3f})")
    hist_ax.set(xlabel="toxicity (probability of the toxic class)", ylabel="summaries", xlim=(0, 1),
                title="Toxicity distribution")
    hist_ax.legend(frameon=False)
    parts = violin_ax.violinplot(values, showmeans=True, showextrema=True)
    for i, body in enumerate(parts["bodies"]):  # same colour per system as in the histogram
        body.set_facecolor(f"C{i}")
        body.set_alpha(0.4)
    violin_ax.set_xticks(range(1, len(systems) + 1), list(systems))
    violin_ax.set(ylabel="toxicity", ylim=(-0.02, 1.02), title=f"Per system (n = {len(records)}; line = mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_judges(summary: dict[str, Any], path: Path) -> Path:
    """One panel per judge: each system's mean toxicity (and, with samples, expected max toxicity) with its CI, so
    a drop that only the reward model sees stands out."""
    plt = _pyplot()
    metrics = summary["metrics"]
    systems, judges = list(metrics["systems"]), metrics["judges"]
    shown = [m for m in ("toxicity", "expected_max_toxicity") if m == "toxicity" or metrics["samples_per_prompt"]]
    fig, axes = plt.subplots(1, len(judges), figsize=(4.2 * len(judges), 3.8), squeeze=False, sharey=True)
    for ax, judge in zip(axes[0], judges):
        for offset, metric in zip((-0.1, 0.1), shown):
            estimates = [metrics["systems"][s]["judges"][judge][metric] for s in systems]
            values = [e["value"] for e in estimates]
            errors = [[v - (e["ci_low"] if e["ci_low"] is not None else v) for v, e in zip(values, estimates)],
                      [(e["ci_high"] if e["ci_high"] is not None else v) - v for v, e in zip(values, estimates)]]
            ax.errorbar([i + offset for i in range(len(systems))], values, yerr=errors, fmt="o", capsize=4,
                        label=METRIC_LABELS[metric])
        ax.set_xticks(range(len(systems)), systems)
        ax.set(title=_judge_label(judge), ylim=(-0.02, 1.02), xlim=(-0.5, len(systems) - 0.5))
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel(f"toxicity ({round(100 * summary['bootstrap']['confidence'])}% CI)")
    axes[0][0].legend(frameon=False, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_ppo_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a PPO log.jsonl; DataError for a line that is not a JSON object."""
    return [row for _, row in read_jsonl(path, fix="is it a train.ppo log.jsonl?")]


def _series(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> tuple[Optional[str], list[float], list[float]]:
    """(key used, steps, values) for the first of `keys` present in the log; steps from 'step' or line order."""
    for key in keys:
        steps, values = [], []
        for i, row in enumerate(rows):
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                steps.append(row.get("step", i + 1))
                values.append(float(value))
        if values:
            return key, steps, values
    return None, [], []


def plot_ppo_curves(rows: Sequence[dict[str, Any]], path: Path) -> Optional[Path]:
    """Reward mean and KL per PPO step, side by side; None when the log has neither."""
    curves = [("reward", *_series(rows, REWARD_KEYS)), ("KL to the KL reference", *_series(rows, KL_KEYS))]
    curves = [c for c in curves if c[1] is not None]
    if not curves:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
    for ax, (title, key, steps, values) in zip(axes[0], curves):
        ax.plot(steps, values, marker="o" if len(values) <= 50 else None, markersize=3)
        ax.set(xlabel="PPO step", ylabel=key, title=title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------
# The report


def write_report(
    summary: dict[str, Any], records: Sequence[dict[str, Any]], out_dir: Path, ppo_log: Optional[Path] = None,
    rows: int = 10,
) -> list[Path]:
    """Write report.md and the plots into `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    metrics = summary["metrics"]
    systems = list(metrics["systems"])
    before, after = metrics["before"], metrics["after"]
    gen = summary["generation"]
    decoding = "greedy" if not gen["do_sample"] else f"sampled (top_k {gen['top_k']}, top_p {gen['top_p']})"
    throughput = summary["throughput"]

    written = [plot_toxicity(records, systems, out_dir / "toxicity.png"), plot_judges(summary, out_dir / "judges.png")]
    curves = plot_ppo_curves(read_ppo_log(ppo_log), out_dir / "ppo_curves.png") if ppo_log else None

    judges = ", ".join(f"{j['name']} ({j['model']}, label {j['toxic_label']}, {j['toxicity']}, {j['where']})"
                       for j in summary.get("judges", [])) or "none (set eval.judges)"
    k = summary.get("samples_per_prompt")
    text = [
        "# Evaluation report", "",
        f"- Data: {summary['data']} ({summary['split']} split), {summary['num_examples']} examples; every system "
        "sees the same prompts and seeds",
        f"- Base model: {summary['model']}; decoding: {decoding}, max_new_tokens {gen['max_new_tokens']}",
        f"- Reward/toxicity: {summary['reward']['model']} scoring `{summary['reward']['text']}` "
        f"({summary['reward']['where']})",
        f"- Held-out toxicity judges: {judges}",
        f"- Samples per prompt: {k} with the training settings ({_sampling(summary['sampling'])})" if k
        else "- Samples per prompt: none (eval.samples_per_prompt null)",
        f"- Confidence intervals: percentile bootstrap, {summary['bootstrap']['samples']} resamples, "
        f"seed {summary['bootstrap']['seed']}",
        f"- Throughput: {throughput['examples_per_second']} examples/s on {throughput['num_processes']} process(es) "
        f"({throughput['seconds']} s)",
        "", "## Metrics", "", metrics_table(summary), "",
        "ROUGE is the F-measure against the best-matching human summary (stemming on). Toxicity is the classifier's "
        "probability of the toxic class; reward is the logit of the non-toxic class.", "",
        "## Before → after", "", comparison_section(summary), "",
        "## Reward-hacking check", "", reward_hacking_section(summary, records, rows), "",
        "## Toxicity by judge", "", judges_section(summary), "",
        "## Diversity and length", "", diversity_section(summary), "",
        "distinct-n is the share of distinct word n-grams: within a prompt, among its sampled summaries (its one "
        "summary without samples), averaged over prompts; across prompts, among the summaries of all prompts (it falls "
        "when a system writes the same thing everywhere). 1 = no repetition. Length is the summary's length in the "
        "policy tokenizer's tokens.", "",
    ]
    if after != before:
        text += [f"## Qualitative: {before} → {after}, sorted by reward improvement", "",
                 qualitative_table(records, before, after, rows), ""]
    text += ["## Plots", "", "![Toxicity by judge](judges.png)", "", "![Toxicity distributions](toxicity.png)", ""]
    if curves is not None:
        text += [f"PPO training curves from `{ppo_log}`:", "", "![PPO reward and KL](ppo_curves.png)", ""]
        written.append(curves)
    report = out_dir / "report.md"
    report.write_text("\n".join(text))
    return [report, *written]
