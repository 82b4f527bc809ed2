"""End to end in a real browser: headless Debian Chromium (driven by Playwright) against `python -m eval.human serve`.

Annotator "ann" answers two items, the server is restarted, "bo" answers three, "ann" resumes and sees only the
items she has not answered; then `python -m eval.human report` runs and its numbers must equal those computed
here from the choices the test clicked, un-blinded with key.json.

Needs /usr/bin/chromium: the fixture runs `.ci/install_browser.sh` (Debian chromium; Playwright needs no chromedriver)
when it is missing, as the SLURM tests start their cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from eval.human.export import export_study
from eval.human.stats import krippendorff_alpha, wilson_interval
from helpers import REPO_ROOT, free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "study-token-123"
SYSTEMS = ["base_model", "ppo_model"]
N_ITEMS = 4

# What each annotator clicks on the k-th item they see: (readability, coherence, flags as {slot: flag}).
CHOICES = {
    "ann": [("A", "B", {"B": "toxic"}), ("tie", "A", {}), ("B", "B", {}), ("A", "tie", {"A": "unusable"})],
    "bo": [("B", "A", {}), ("A", "A", {"A": "toxic"}), ("tie", "tie", {})],
}


def write_eval_examples(path: Path, n: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "examples.jsonl", "w") as f:
        for i in range(n):
            turns = "\n".join(f"#Person{1 + t % 2}#: Line {t} of dialogue {i}, about the weekend plans." for t in range(6))
            f.write(json.dumps({
                "id": f"test_{i}", "dialogue": turns, "human_summaries": ["They plan the weekend."],
                "systems": {s: {"summary": f"#Person1# and #Person2# plan the weekend ({s[0]}{i}).", "reward": 0.0,
                                "toxicity": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}
                            for s in SYSTEMS},
            }) + "\n")
    return path


class Server:
    """`python -m eval.human serve` as a real subprocess on 127.0.0.1."""

    def __init__(self, items: Path, db: Path, log: Path) -> None:
        self.items, self.db, self.log, self.port = items, db, log, free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "DETOX_HUMAN_TOKEN": TOKEN}
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "eval.human", "serve", "--human.study_dir", str(self.items),
                 "--human.db", str(self.db), "--human.port", str(self.port)],
                cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        pytest.fail(f"the server did not answer within 30 s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)
        self.process = None


@pytest.fixture
def browser_type() -> Iterator:
    if not CHROMIUM.exists():  # a fresh machine: install it as the SLURM tests start their cluster
        installed = subprocess.run(["bash", str(REPO_ROOT / ".ci/install_browser.sh")], capture_output=True, text=True,
                                   timeout=900)
        assert installed.returncode == 0 and CHROMIUM.exists(), (
            f".ci/install_browser.sh could not install {CHROMIUM} (root and Debian's archive are needed):\n"
            f"{installed.stderr[-3000:]}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]' (never `playwright install`: "
                    "the test uses Debian's /usr/bin/chromium)")
    with sync_playwright() as playwright:
        yield playwright.chromium


def test_install_browser_installs_only_what_playwright_uses() -> None:
    # Playwright drives Chromium over a pipe of its own: chromedriver (Selenium's) is neither installed nor required.
    script = (REPO_ROOT / ".ci/install_browser.sh").read_text().splitlines()
    installs = [line.split("--no-install-recommends", 1)[1].split() for line in script if "apt-get install" in line]
    assert installs == [["chromium", "fonts-dejavu-core"]]
    checks = [line for line in script if line.lstrip().startswith("if [")]
    assert [word for line in checks for word in line.split() if word.startswith("/")] == [str(CHROMIUM)]


def open_browser(browser_type, profile: Path):
    """A fresh Chromium profile per annotator: its own cookies, like a separate person's browser."""
    context = browser_type.launch_persistent_context(
        str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    context.set_default_timeout(15_000)
    return context, (context.pages[0] if context.pages else context.new_page())


def sign_in(page, url: str, name: str) -> None:
    page.goto(f"{url}/")
    page.get_by_label("Your name").fill(name)
    page.get_by_label("Access token (from the study organiser)").fill("wrong")
    page.get_by_role("button", name="Start").click()
    assert "Wrong access token" in page.locator("[role=alert]").inner_text()  # a bad token is refused
    page.get_by_label("Access token (from the study organiser)").fill(TOKEN)
    page.get_by_role("button", name="Start").click()
    page.wait_for_url("**/item/*")


def answer_items(page, url: str, name: str, count: int, answered: dict[str, list],
                 screenshot: Path | None = None) -> list[str]:
    """Answer `count` items in the order the server gives them, recording the item ids and the choices."""
    seen = []
    for _ in range(count):
        page.goto(f"{url}/next")
        page.wait_for_url("**/item/*")
        item_id = page.url.rsplit("/", 1)[1]
        k = len(answered[name])
        heading = page.locator("h1").inner_text()
        assert heading == f"Item {k + 1} of {N_ITEMS}", heading
        readability, coherence, flags = CHOICES[name][k]
        for criterion, choice in (("readability", readability), ("coherence", coherence)):
            page.locator(f"input[name=better_{criterion}][value={choice}]").check()
        for slot, flag in flags.items():
            page.locator(f"input[name=flag_{slot}][value={flag}]").check()
        if screenshot is not None and not seen:
            page.screenshot(path=str(screenshot), full_page=True)  # for looking at the page by eye
        page.get_by_role("button", name="Submit and continue").click()
        page.wait_for_load_state()
        answered[name].append((item_id, readability, coherence, flags))
        seen.append(item_id)
    return seen


def test_two_annotators_with_a_restart_and_the_report(tmp_path: Path, browser_type) -> None:
    started = time.monotonic()
    study = export_study(write_eval_examples(tmp_path / "eval", 6), tmp_path / "human", n=N_ITEMS, seed=7)
    db = tmp_path / "answers.sqlite"
    server = Server(study, db, tmp_path / "server.log")
    answered: dict[str, list] = {"ann": [], "bo": []}
    ann_context = bo_context = None
    try:
        server.start()
        ann_context, ann = open_browser(browser_type, tmp_path / "profile-ann")
        sign_in(ann, server.url, "ann")
        first_two = answer_items(ann, server.url, "ann", 2, answered, screenshot=tmp_path / "item.png")

        # Back button and resubmit: either the cached form posts again (refused) or the page says it was answered.
        ann.go_back()
        ann.wait_for_load_state()
        submit = ann.get_by_role("button", name="Submit and continue")
        if submit.count():
            submit.click()
            ann.wait_for_load_state()
        assert "Already answered" in ann.locator("h1").inner_text()

        server.stop()
        server.start()  # same port, same database

        bo_context, bo = open_browser(browser_type, tmp_path / "profile-bo")
        sign_in(bo, server.url, "bo")
        answer_items(bo, server.url, "bo", 3, answered)

        # "ann" resumes in the same browser: still signed in after the restart, and only unanswered items come.
        rest = answer_items(ann, server.url, "ann", 2, answered)
        assert not set(rest) & set(first_two) and len(set(first_two + rest)) == N_ITEMS
        ann.goto(f"{server.url}/next")
        assert ann.locator("h1").inner_text() == "All done"
        assert f"You have answered {N_ITEMS} of {N_ITEMS} items" in ann.content()
    finally:
        for context in (ann_context, bo_context):
            if context is not None:
                context.close()
        server.stop()

    result = subprocess.run([sys.executable, "-m", "eval.human", "report", "--human.study_dir", str(study),
                             "--human.db", str(db), "--human.report_dir", str(tmp_path / "report")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report/report.json").read_text())

    # By hand: un-blind each click with key.json; the chosen system wins 1, the other 0; "tie" gives 0.5 each.
    key = json.loads((study / "key.json").read_text())["items"]
    expected_wins = {c: {s: 0.0 for s in SYSTEMS} for c in ("readability", "coherence")}
    rank_sums = {c: {s: 0.0 for s in SYSTEMS} for c in ("readability", "coherence")}
    flags = {s: {"toxic": 0, "unusable": 0} for s in SYSTEMS}
    ranks_by_unit: dict[str, dict[tuple[str, str], list[float]]] = {"readability": {}, "coherence": {}}
    n_answers = sum(len(v) for v in answered.values())
    for name, rows in answered.items():
        for item_id, readability, coherence, raised in rows:
            system_of = key[item_id]["slots"]
            for criterion, choice in (("readability", readability), ("coherence", coherence)):
                for slot, system in system_of.items():
                    win = 0.5 if choice == "tie" else float(slot == choice)
                    rank = 1.5 if choice == "tie" else (1.0 if slot == choice else 2.0)
                    expected_wins[criterion][system] += win
                    rank_sums[criterion][system] += rank
                    ranks_by_unit[criterion].setdefault((item_id, system), []).append(rank)
            for slot, flag in raised.items():
                flags[system_of[slot]][flag] += 1

    assert report["answers"] == n_answers == 7 and report["annotators"] == {"ann": 4, "bo": 3}
    assert report["items_with_2plus_annotators"] == 3
    for criterion in ("readability", "coherence"):
        got = report["criteria"][criterion]
        for system in SYSTEMS:
            w = got["win_rate"][system]
            assert w["wins"] == expected_wins[criterion][system] and w["comparisons"] == n_answers
            assert w["rate"] == pytest.approx(expected_wins[criterion][system] / n_answers)
            assert (w["ci_low"], w["ci_high"]) == pytest.approx(wilson_interval(w["wins"], n_answers))
            assert got["mean_rank"][system] == pytest.approx(rank_sums[criterion][system] / n_answers)
        units = {u: v for u, v in ranks_by_unit[criterion].items() if len(v) >= 2}
        assert len(units) == 3 * len(SYSTEMS)
        expected_alpha = krippendorff_alpha(units, "ordinal")
        assert got["krippendorff_alpha_ordinal"] == (pytest.approx(expected_alpha) if expected_alpha is not None else None)
    for system in SYSTEMS:
        assert report["flags"][system] == {"shown": n_answers, **flags[system]}
    markdown = (tmp_path / "report/report.md").read_text()
    assert "7 answers from 2 annotators on 4 of 4 items" in markdown
    assert (tmp_path / "report/report.png").stat().st_size > 1000
    assert (tmp_path / "item.png").stat().st_size > 1000
    assert time.monotonic() - started < 120
