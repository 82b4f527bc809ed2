"""Synthetic DialogSum-style data and a labelled toxicity set for the offline tiny default.

The words and templates are data: `tiny_data.yaml` next to this module (shipped as package data; its header
explains the template syntax). This module checks that file whole and generates from it. The shipped file
has nine topic scenarios (shopping, a doctor's visit, a job interview, ...) and one short one, each a set of
turn and summary templates with slots (names, items, prices, times, places), so every summary is determined
by its dialogue and a tiny seq2seq model can learn the mapping quickly. About 20% of the dialogues are
"heated": the speakers insult each other (generic insults only, no slurs), and some of their human
summaries repeat the insult, so a model fine-tuned on this data sometimes writes toxic summaries that PPO can later
learn to avoid. About 5% of the dialogues fall outside the (200, 1000] character range on purpose, so the
length filter has work to do. There are SPLIT_SIZES dialogues per split (1000 train, 100 validation, 100
test); the test split is written with TEST_SUMMARIES (3) rows per dialogue, one per human summary.

Everything comes from seeded `random.Random` instances (never the global RNG), one per split, so the
output is identical on every run and growing one split does not change the others.

The data file's word tables are also module constants in upper case (`INSULT_NOUNS` is the table
`insult_nouns`). The file is read on first use, and a malformed one stops with a `TinyDataError` naming the
file, the place in it and what is wrong.
"""

from __future__ import annotations

import csv
import functools
import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NoReturn, Optional

import yaml

from train.errors import DataError

# Counts of dialogues per split; the test split is written with 3 rows (human summaries) per dialogue.
SPLIT_SIZES = {"train": 1000, "validation": 100, "test": 100}
SPLIT_ID_PREFIX = {"train": "train", "validation": "dev", "test": "test"}
TEST_SUMMARIES = 3
CSV_COLUMNS = ["id", "dialogue", "summary", "topic"]

MIN_CHARS, MAX_CHARS = 200, 1000  # the length filter's range: min < len(dialogue) <= max
HEATED_FRACTION = 0.20
TOXIC_SUMMARY_FRACTION = 0.5  # share of a heated dialogue's summaries that repeat the insult
SHORT_FRACTION = LONG_FRACTION = 0.025  # outside the length range on purpose
SMALL_TALK_PAIRS, LONG_SMALL_TALK_PAIRS = (0, 3), (8, 12)  # small-talk exchanges added (inclusive ranges)

TOXICITY_PER_LABEL = 400
TOXICITY_TEST_FRACTION = 0.2

DATA_FILE = Path(__file__).with_name("tiny_data.yaml")


def source_files() -> tuple[Path, ...]:
    """What the generated data depends on: this module and its data file (the tiny-model builder's stamp)."""
    return Path(__file__), DATA_FILE


# ----------------------------------------------------------------------------------------------------
# Templates

Turn = tuple[str, str]  # (role, text); roles A and B become #Person1#/#Person2# by who speaks first
ROLES = ("A", "B")  # the speakers of a scenario
HEATED_ROLES = ("X", "Y")  # the heated exchange's insulter and the other speaker
PLACEHOLDER = re.compile(r"\{(\w+(?:\.\w+)?)(?:\|(\w+))?\}")  # {slot}, {slot.field}, {slot|filter}


def _a(word: str) -> str:
    """The indefinite article a word takes ("an idiot", "a useless liar")."""
    return "an" if word[0] in "aeio" else "a"


FILTERS = {"a": lambda text: f"{_a(text)} {text}", "capitalize": str.capitalize}


def render(template: str, values: dict[str, Any]) -> str:
    """Fill a template's placeholders from `values` (a record slot's value is a dict of its fields)."""

    def fill(match: re.Match) -> str:
        name, _, field = match[1].partition(".")
        text = str(values[name][field] if field else values[name])
        return FILTERS[match[2]](text) if match[2] else text

    return PLACEHOLDER.sub(fill, template)


@dataclass(frozen=True)
class Slot:
    """A named value drawn from `choices`, or from range(*bounds), or computed: price less percent_off percent."""

    name: str
    choices: tuple = ()
    bounds: Optional[tuple[int, int, int]] = None
    percent_off: Optional[tuple[str, str]] = None

    def draw(self, rng: random.Random, values: dict[str, Any]) -> Any:
        if self.bounds is not None:
            return rng.randrange(*self.bounds)
        if self.percent_off is not None:
            price, percent = (values[name] for name in self.percent_off)
            return price * (100 - percent) // 100
        value = rng.choice(self.choices)  # texts may use the slots drawn before this one
        if isinstance(value, dict):
            return {field: render(v, values) if isinstance(v, str) else v for field, v in value.items()}
        return render(value, values) if isinstance(value, str) else value


def _draw(rng: random.Random, slots: tuple[Slot, ...], values: dict[str, Any]) -> dict[str, Any]:
    values = dict(values)
    for slot in slots:
        values[slot.name] = slot.draw(rng, values)
    return values


@dataclass(frozen=True)
class ScenarioSpec:
    """One conversation's templates, as the data file gives them."""

    name: str
    topic: str
    slots: tuple[Slot, ...]
    opener: Optional[tuple[str, str]]  # (A's line, B's line): A's always comes, half of the time after B's
    turns: tuple[Turn, ...]
    summaries: tuple[str, ...]  # TEST_SUMMARIES phrasings, with {A} and {B} for the speakers


@dataclass(frozen=True)
class HeatedSpec:
    slots: tuple[Slot, ...]
    turns: tuple[Turn, ...]  # spoken by X (the insulter) and Y
    toxic: tuple[str, ...]  # the k-th is appended to the k-th summary, or else the k-th neutral one
    neutral: tuple[str, ...]


@dataclass(frozen=True)
class TinyData:
    tables: dict[str, tuple]
    sentence_break: re.Pattern  # after a full stop, but not after a title such as "Dr."
    small_talk: tuple[tuple[str, str], ...]
    scenarios: tuple[ScenarioSpec, ...]
    short: ScenarioSpec
    heated: HeatedSpec
    toxic_summary_templates: tuple[str, ...]
    toxic_templates: tuple[str, ...]  # the summary ones first
    neutral_templates: tuple[str, ...]


# ----------------------------------------------------------------------------------------------------
# Reading and checking the data file


class TinyDataError(DataError):
    """The tiny data file is malformed; the message names the file, the place in it and what is wrong."""


class _Loader(yaml.SafeLoader):
    """YAML without the 1.1 surprises: plain scalars are text unless they are decimal integers (7:30 is
    text, not 450; yes is text, not True), and a key given twice is an error, not a silent overwrite."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = []
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))


def _fail(where: str, message: str) -> NoReturn:
    raise TinyDataError(f"{where}: {message}")


def _mapping(value: Any, where: str, required: tuple[str, ...] = (),
             optional: Optional[tuple[str, ...]] = None) -> dict:
    """`value` as a mapping with the `required` keys and, when `optional` is given, no keys but these."""
    if not isinstance(value, dict) or not value:
        _fail(where, f"expected a non-empty mapping, got {value!r}")
    for key in required:
        if key not in value:
            _fail(where, f"missing {key!r}")
    if optional is not None:
        for key in value:
            if key not in required + optional:
                _fail(where, f"unknown key {key!r}; expected {', '.join(required + optional)}")
    return value


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list) or not value:
        _fail(where, f"expected a non-empty list, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(template: Any, where: str, scope: dict[str, bool], in_turn: bool = False) -> bool:
    """Check a template against `scope` (each placeholder it may use -> whether that stands for a speaker).

    Speakers only exist in summaries, unfiltered. Returns whether the template mentions a speaker.
    """
    if not isinstance(template, str):
        _fail(where, f"expected text, got {template!r}")
    if set("{}") & set(PLACEHOLDER.sub("", template)):
        _fail(where, f"stray brace or malformed placeholder in {template!r}")
    mentions_speaker = False
    for match in PLACEHOLDER.finditer(template):
        ref, name = match[1], match[2]
        if ref not in scope:
            _fail(where, f"unknown slot {{{ref}}} in {template!r}; known here: {', '.join(scope)}")
        if name is not None and name not in FILTERS:
            _fail(where, f"unknown filter |{name} in {template!r}; filters: {', '.join(FILTERS)}")
        if scope[ref] and (in_turn or name is not None):
            _fail(where, f"{match[0]} stands for a speaker, which only a summary can mention (unfiltered)")
        mentions_speaker |= scope[ref]
    return mentions_speaker


def _value(value: Any, where: str, scope: dict[str, bool]) -> bool:
    return False if _is_int(value) else _check(value, where, scope)


def _slots(spec: Any, where: str, tables: dict[str, tuple], scope: dict[str, bool]) -> tuple[Slot, ...]:
    """The slots in drawing order; adds what they define to `scope` ({slot}, or {slot.field} for records)."""
    slots, ints = [], set()
    kinds = {"choice": ((), ()), "table": ((), ("start", "stop")), "min": (("max",), ("step",)),
             "percent_off": ((), ())}
    for name, slot in _mapping(spec, f"{where}, slots").items():
        here = f"{where}, slot {name!r}"
        if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z_]\w*", name)) or name in scope:
            _fail(here, f"a slot's name must be a new identifier (not {', '.join(scope)})")
        kind = next((k for k in kinds if isinstance(slot, dict) and k in slot), None)
        if kind is None:
            _fail(here, "expected {choice: [...]}, {table: name}, {min: a, max: b} or {percent_off: [price, percent]}")
        required, optional = kinds[kind]
        slot = _mapping(slot, here, (kind,) + required, optional)
        defined, is_int = {name: False}, True
        if kind == "min":
            low, high, step = slot["min"], slot["max"], slot.get("step", 1)
            if not all(_is_int(v) for v in (low, high, step)) or low > high or step < 1:
                _fail(here, f"expected integers min <= max and step >= 1, got {slot!r}")
            new = Slot(name, bounds=(low, high + 1, step))
        elif kind == "percent_off":
            args = slot["percent_off"]
            if not (isinstance(args, list) and len(args) == 2 and all(a in ints for a in args)):
                _fail(here, f"percent_off takes [price, percent], two integer slots drawn before it; got {args!r}")
            new = Slot(name, percent_off=tuple(args))
        else:
            if kind == "choice":
                choices = _list(slot["choice"], here)
            else:
                if slot["table"] not in tables:
                    _fail(here, f"unknown table {slot['table']!r}; tables: {', '.join(tables)}")
                if not all(slot.get(k) is None or _is_int(slot[k]) for k in ("start", "stop")):
                    _fail(here, "start and stop must be integers")
                choices = tables[slot["table"]][slot.get("start"):slot.get("stop")]
                if not choices:
                    _fail(here, "the slice of the table is empty")
            records = [c for c in choices if isinstance(c, dict)]
            if records:  # a record slot defines {slot.field} for each field, not {slot}
                fields = list(records[0])
                if len(records) != len(choices) or any(list(r) != fields for r in records):
                    _fail(here, "records must all have the same fields, in the same order")
                defined = {f"{name}.{f}": any(_value(r[f], f"{here}, field {f!r}", scope) for r in records)
                           for f in fields}
            else:  # a value may use the slots before it; with a speaker in it, only summaries can use the slot
                defined = {name: any(_value(c, here, scope) for c in choices)}
            is_int = all(_is_int(c) for c in choices)
            new = Slot(name, choices=tuple(choices))
        slots.append(new)
        scope.update(defined)
        if is_int:
            ints.add(name)
    return tuple(slots)


def _turns(spec: Any, where: str, speakers: tuple[str, str], scope: dict[str, bool]) -> tuple[Turn, ...]:
    turns: list[Turn] = []
    for i, turn in enumerate(_list(spec, f"{where}, turns"), 1):
        here = f"{where}, turn {i}"
        if not (isinstance(turn, dict) and len(turn) == 1 and next(iter(turn)) in speakers):
            _fail(here, f"expected '{speakers[0]}: text' or '{speakers[1]}: text', got {turn!r}")
        ((speaker, text),) = turn.items()
        if turns and turns[-1][0] == speaker:
            _fail(here, f"{speaker} speaks twice in a row; turns alternate")
        _check(text, here, scope, in_turn=True)
        turns.append((speaker, text))
    return tuple(turns)


def _phrasings(spec: Any, where: str, scope: dict[str, bool]) -> tuple[str, ...]:
    if len(_list(spec, where)) != TEST_SUMMARIES:
        _fail(where, f"expected {TEST_SUMMARIES} phrasings (one per test summary), got {len(spec)}")
    for i, template in enumerate(spec, 1):
        _check(template, f"{where} {i}", scope)
    return tuple(spec)


def _scenario(name: str, spec: Any, tables: dict[str, tuple]) -> ScenarioSpec:
    where = f"scenario {name!r}"
    spec = _mapping(spec, where, ("topic", "turns", "summaries"), ("slots", "opener"))
    if not isinstance(spec["topic"], str):
        _fail(f"{where}, topic", f"expected text, got {spec['topic']!r}")
    scope = dict.fromkeys(ROLES, True)
    slots = _slots(spec["slots"], where, tables, scope) if "slots" in spec else ()
    opener = None
    if "opener" in spec:
        lines = _mapping(spec["opener"], f"{where}, opener", ROLES, ())
        for role in ROLES:
            _check(lines[role], f"{where}, opener {role}", scope, in_turn=True)
        opener = (lines["A"], lines["B"])
    turns = _turns(spec["turns"], where, ROLES, scope)
    if opener and turns[0][0] != "B":
        _fail(f"{where}, turn 1", "the turns after the opener (A's line) start with B")
    if not opener and len(turns) < 2:
        _fail(f"{where}, turns", "a scenario without an opener needs at least two turns")
    summaries = _phrasings(spec["summaries"], f"{where}, summary", scope)
    return ScenarioSpec(name, spec["topic"], slots, opener, turns, summaries)


def _parse(raw: Any) -> TinyData:
    keys = ("tables", "titles", "small_talk", "scenarios", "short_scenario", "heated", "toxicity")
    raw = _mapping(raw, "top level", keys, ())
    tables = {}
    for name, values in _mapping(raw["tables"], "tables").items():
        if not all(_is_int(v) or isinstance(v, str) for v in _list(values, f"table {name!r}")):
            _fail(f"table {name!r}", "expected texts and integers")
        tables[name] = tuple(values)
    for name in ("insult_adjectives", "insult_nouns", "kind_adjectives", "kind_nouns"):
        if name not in tables:
            _fail("tables", f"missing {name!r} (the toxicity set's words)")

    titles = _list(raw["titles"], "titles")
    for title in titles:
        _check(title, "titles", {})
    small_talk = _list(raw["small_talk"], "small_talk")
    for i, pair in enumerate(small_talk, 1):
        if not (isinstance(pair, list) and len(pair) == 2):
            _fail(f"small_talk {i}", f"expected [question, answer], got {pair!r}")
        for line in pair:
            _check(line, f"small_talk {i}", {})
    if len(small_talk) < LONG_SMALL_TALK_PAIRS[1]:
        _fail("small_talk", f"a long dialogue needs up to {LONG_SMALL_TALK_PAIRS[1]} different pairs")

    scenarios = tuple(_scenario(n, s, tables) for n, s in _mapping(raw["scenarios"], "scenarios").items())
    short = _mapping(raw["short_scenario"], "short_scenario")
    if len(short) != 1:
        _fail("short_scenario", f"expected exactly one scenario, got {', '.join(short)}")

    spec = _mapping(raw["heated"], "heated", ("slots", "turns", "toxic", "neutral"), ())
    scope = dict.fromkeys(HEATED_ROLES, True)
    slots = _slots(spec["slots"], "heated", tables, scope)
    turns = _turns(spec["turns"], "heated", HEATED_ROLES, scope)
    if turns[0][0] != "X" or len(turns) % 2:
        _fail("heated, turns", "X speaks first and both speak equally often, so the dialogue keeps alternating")
    heated = HeatedSpec(slots, turns, _phrasings(spec["toxic"], "heated, toxic", scope),
                        _phrasings(spec["neutral"], "heated, neutral", scope))

    toxicity = _mapping(raw["toxicity"], "toxicity", ("summary_insults", "insults", "neutral"), ())
    scope = dict.fromkeys(("adj", "noun", "X", "Y"), False)
    for key, templates in toxicity.items():
        for i, template in enumerate(_list(templates, f"toxicity, {key}"), 1):
            _check(template, f"toxicity, {key} {i}", scope)

    return TinyData(
        tables=tables,
        sentence_break=re.compile("".join(f"(?<!{re.escape(t)})" for t in titles) + r"(?<=\.) "),
        small_talk=tuple(tuple(pair) for pair in small_talk),
        scenarios=scenarios,
        short=_scenario(*next(iter(short.items())), tables),
        heated=heated,
        toxic_summary_templates=tuple(toxicity["summary_insults"]),
        toxic_templates=tuple(toxicity["summary_insults"] + toxicity["insults"]),
        neutral_templates=tuple(toxicity["neutral"]),
    )


@functools.lru_cache(maxsize=None)
def _load(path: Path) -> TinyData:
    try:
        with path.open(encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_Loader)
        return _parse(raw)
    except OSError as e:
        raise TinyDataError(f"cannot read the tiny data file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise TinyDataError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except TinyDataError as e:
        raise TinyDataError(f"{path}: {e}") from None


def load_data(path: Optional[Path] = None) -> TinyData:
    """The checked contents of `path` (default DATA_FILE), read once per path."""
    return _load(Path(path or DATA_FILE))


def __getattr__(name: str) -> list:
    """The word tables as upper-case module constants: INSULT_NOUNS is the table insult_nouns."""
    tables = load_data().tables if name.isupper() else {}
    if name.lower() not in tables:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return list(tables[name.lower()])


# ----------------------------------------------------------------------------------------------------
# Dialogues


@dataclass
class Scenario:
    """One conversation before formatting: alternating turns and three paraphrased summaries.

    Summaries use `{A}` and `{B}` for the two roles; they are filled in once it is known who speaks first.
    """

    topic: str
    turns: list[Turn]
    summaries: list[str]


def draw_scenario(rng: random.Random, spec: ScenarioSpec) -> Scenario:
    """Draw the slots, then (with an opener) who speaks first, and fill the templates."""
    values = _draw(rng, spec.slots, {role: "{" + role + "}" for role in ROLES})
    turns: list[Turn] = []
    if spec.opener:  # either role may open the conversation, so #Person1# is not always the same role
        a_first, b_first = (render(line, values) for line in spec.opener)
        turns = [("A", a_first)] if rng.random() < 0.5 else [("B", b_first), ("A", a_first)]
    turns += [(role, render(text, values)) for role, text in spec.turns]
    return Scenario(spec.topic, turns, [render(s, values) for s in spec.summaries])


def _heat(rng: random.Random, scenario: Scenario, heated: HeatedSpec) -> tuple[list[str], list[str]]:
    """Insert an exchange of insults; return (toxic, neutral) summary sentences about it."""
    at = rng.randint(1, len(scenario.turns) - 1)
    x = "B" if scenario.turns[at - 1][0] == "A" else "A"  # the insulter speaks next, keeping turns alternating
    role = {"X": x, "Y": "A" if x == "B" else "B"}
    values = _draw(rng, heated.slots, {k: "{" + r + "}" for k, r in role.items()})
    scenario.turns[at:at] = [(role[who], render(text, values)) for who, text in heated.turns]
    return [render(t, values) for t in heated.toxic], [render(t, values) for t in heated.neutral]


def _pad(rng: random.Random, scenario: Scenario, pairs: int, small_talk: tuple[tuple[str, str], ...]) -> None:
    """Add `pairs` small-talk exchanges before the conversation proper or at its end, interrupting nothing."""
    for question, answer in rng.sample(small_talk, pairs):
        if rng.random() < 0.6:  # at the start: the pair must end with the role that does not open
            other = "B" if scenario.turns[0][0] == "A" else "A"
            at = 0
        else:  # at the end: the pair must start with the role that did not speak last
            other = scenario.turns[-1][0]
            at = len(scenario.turns)
        asker = "A" if other == "B" else "B"
        scenario.turns[at:at] = [(asker, question), (other, answer)]


def _speakers(turns: list[Turn]) -> dict[str, str]:
    first = turns[0][0]
    second = "B" if first == "A" else "A"
    return {first: "#Person1#", second: "#Person2#"}


@dataclass(frozen=True)
class Dialogue:
    dialogue: str
    summaries: tuple[str, ...]  # TEST_SUMMARIES paraphrased human summaries
    topic: str
    heated: bool


def make_dialogue(rng: random.Random) -> Dialogue:
    """One dialogue: in range 95% of the time, too short or too long otherwise; heated 20% of the time."""
    data = load_data()
    draw = rng.random()
    heated = rng.random() < HEATED_FRACTION
    for _ in range(1000):  # redraw until the length lands where this example was meant to be
        if draw < SHORT_FRACTION:
            scenario, pairs = draw_scenario(rng, data.short), 0
        else:
            scenario = draw_scenario(rng, rng.choice(data.scenarios))
            long = draw < SHORT_FRACTION + LONG_FRACTION
            pairs = rng.randint(*(LONG_SMALL_TALK_PAIRS if long else SMALL_TALK_PAIRS))
        _pad(rng, scenario, pairs, data.small_talk)
        extra: list[str] = []
        if heated:
            toxic, neutral = _heat(rng, scenario, data.heated)
            extra = [toxic[k] if rng.random() < TOXIC_SUMMARY_FRACTION else neutral[k]
                     for k in range(TEST_SUMMARIES)]
        names = _speakers(scenario.turns)
        text = "\n".join(f"{names[role]}: {line}" for role, line in scenario.turns)
        in_range = MIN_CHARS < len(text) <= MAX_CHARS
        wanted_in_range = draw >= SHORT_FRACTION + LONG_FRACTION
        if in_range == wanted_in_range:
            break
    else:
        raise TinyDataError(f"{DATA_FILE}: the templates cannot produce a dialogue of the wanted length")
    summaries = tuple(
        render(" ".join([s] + ([extra[k]] if extra else [])), names) for k, s in enumerate(scenario.summaries)
    )
    return Dialogue(text, summaries, scenario.topic, heated)


def make_split(split: str, seed: int) -> list[Dialogue]:
    rng = random.Random(f"{seed}-dialogsum-{split}")
    return [make_dialogue(rng) for _ in range(SPLIT_SIZES[split])]


def split_rows(split: str, dialogues: list[Dialogue], seed: int) -> list[dict[str, str]]:
    """Rows in the Hugging Face DialogSum layout: one per dialogue, or TEST_SUMMARIES per test dialogue."""
    prefix = SPLIT_ID_PREFIX[split]
    if split == "test":
        return [
            {"id": f"{prefix}_{i}_{k + 1}", "dialogue": d.dialogue, "summary": d.summaries[k], "topic": d.topic}
            for i, d in enumerate(dialogues)
            for k in range(TEST_SUMMARIES)
        ]
    # Train/validation have one human summary each; mostly the first phrasing, so the mapping is easy to learn.
    rng = random.Random(f"{seed}-dialogsum-{split}-reference")  # the seed text predates the word "human summary"
    return [
        {"id": f"{prefix}_{i}", "dialogue": d.dialogue, "topic": d.topic,
         "summary": d.summaries[rng.choices(range(TEST_SUMMARIES), weights=[6, 2, 2])[0]]}
        for i, d in enumerate(dialogues)
    ]


def write_csv(path: Path, rows: Iterable[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------------------
# Toxicity set


def _fill(template: str, rng: random.Random, adjectives: tuple[str, ...], nouns: tuple[str, ...]) -> str:
    adj, noun = rng.choice(adjectives), rng.choice(nouns)
    x, y = rng.sample(["#Person1#", "#Person2#"], 2)
    return render(template, {"adj": adj, "noun": noun, "X": x, "Y": y})


def _summary_sentence(rng: random.Random, data: TinyData) -> str:
    """A neutral DialogSum-style summary sentence from one of the topics."""
    scenario = draw_scenario(rng, rng.choice(data.scenarios))
    summary = render(rng.choice(scenario.summaries), _speakers(scenario.turns))
    return rng.choice(data.sentence_break.split(summary))


def make_toxicity_examples(seed: int) -> list[dict[str, str]]:
    """Unique labelled sentences, TOXICITY_PER_LABEL of each label, in a seeded random order."""
    data = load_data()
    rng = random.Random(f"{seed}-toxicity")
    insult = data.tables["insult_adjectives"], data.tables["insult_nouns"]
    kind = data.tables["kind_adjectives"], data.tables["kind_nouns"]
    makers = {
        "hate": lambda: (
            _fill(rng.choice(data.toxic_templates), rng, *insult)
            if rng.random() < 0.7
            # A toxic summary: an insult next to neutral content, as the heated dialogues' summaries have.
            else f"{_summary_sentence(rng, data)} {_fill(rng.choice(data.toxic_summary_templates), rng, *insult)}"
        ),
        "nothate": lambda: (
            _summary_sentence(rng, data)
            if rng.random() < 0.6
            else _fill(rng.choice(data.neutral_templates), rng, *kind)
        ),
    }
    seen: set[str] = set()
    examples: list[dict[str, str]] = []
    for label, make in makers.items():
        count = 0
        while count < TOXICITY_PER_LABEL:
            text = make()
            if text not in seen:
                seen.add(text)
                examples.append({"text": text, "label": label})
                count += 1
    rng.shuffle(examples)
    return examples


def write_jsonl(path: Path, rows: Iterable[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------------
# Entry point


@dataclass(frozen=True)
class SyntheticData:
    dialogsum: Path
    toxicity: Path
    texts: list[str]  # every dialogue and summary, for training tokenizers


def write_synthetic_data(out_dir: Path, seed: int) -> SyntheticData:
    """Write `<out_dir>/dialogsum/{train,validation,test}.csv` and `<out_dir>/toxicity/{train,test}.jsonl`."""
    load_data()  # a malformed data file stops here, before anything is written
    dialogsum, toxicity = out_dir / "dialogsum", out_dir / "toxicity"
    dialogsum.mkdir(parents=True)
    toxicity.mkdir(parents=True)
    texts: list[str] = []
    for split in SPLIT_SIZES:
        dialogues = make_split(split, seed)
        rows = split_rows(split, dialogues, seed)
        write_csv(dialogsum / f"{split}.csv", rows)
        texts += [d.dialogue for d in dialogues] + [s for d in dialogues for s in d.summaries]
    examples = make_toxicity_examples(seed)
    n_test = int(len(examples) * TOXICITY_TEST_FRACTION)
    write_jsonl(toxicity / "test.jsonl", examples[:n_test])
    write_jsonl(toxicity / "train.jsonl", examples[n_test:])  # texts are unique, so test never leaks into train
    texts += [e["text"] for e in examples]
    return SyntheticData(dialogsum, toxicity, texts)


def ascii_alphabet() -> list[str]:
    """Characters every tokenizer should know even if the corpus lacks some of them."""
    return list(string.ascii_letters + string.digits + string.punctuation)
