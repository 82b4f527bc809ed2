"""Synthetic DialogSum-style data and a labelled toxicity set for the offline tiny default.

The dialogues are built from topic templates with slots (names, items, prices, times, places), so every
summary is determined by its dialogue and a tiny seq2seq model can learn the mapping quickly. About 20%
are "heated": the speakers insult each other (generic insults only, no slurs), and some of their
references repeat the insult, so a model fine-tuned on this data sometimes writes toxic summaries that
PPO can later learn to avoid. About 5% of the dialogues fall outside the (200, 1000] character range on
purpose, so the length filter has work to do.

Everything comes from seeded `random.Random` instances (never the global RNG), one per split, so the
output is identical on every run and growing one split does not change the others.
"""

from __future__ import annotations

import csv
import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

# Counts of dialogues per split; the test split is written with 3 reference rows per dialogue.
SPLIT_SIZES = {"train": 1000, "validation": 100, "test": 100}
SPLIT_ID_PREFIX = {"train": "train", "validation": "dev", "test": "test"}
TEST_REFERENCES = 3
CSV_COLUMNS = ["id", "dialogue", "summary", "topic"]

MIN_CHARS, MAX_CHARS = 200, 1000  # the length filter's range: min < len(dialogue) <= max
HEATED_FRACTION = 0.20
TOXIC_REFERENCE_FRACTION = 0.5  # share of a heated dialogue's references that repeat the insult
SHORT_FRACTION = LONG_FRACTION = 0.025  # outside the length range on purpose

TOXICITY_PER_LABEL = 400
TOXICITY_TEST_FRACTION = 0.2

# ----------------------------------------------------------------------------------------------------
# Vocabulary shared by the heated dialogues and the toxicity set

INSULT_ADJECTIVES = [
    "stupid", "useless", "pathetic", "dumb", "worthless", "lazy", "clueless",
    "incompetent", "brainless", "miserable", "ridiculous", "disgusting",
]
INSULT_NOUNS = ["idiot", "liar", "fool", "loser", "moron", "clown", "jerk", "creep", "coward", "failure"]
KIND_ADJECTIVES = ["kind", "helpful", "wonderful", "patient", "generous", "smart", "friendly", "thoughtful", "great"]
KIND_NOUNS = ["friend", "neighbour", "colleague", "teacher", "person", "host", "partner", "cook", "student"]
OUTBURSTS = ["Are you kidding me?", "Unbelievable!", "Oh, come on!", "Listen to yourself!", "What is wrong with you?"]
# Comeback -> how a summary reports it.
COMEBACKS = {
    "Shut up": "tells {X} to shut up",
    "Get lost": "tells {X} to get lost",
    "Don't talk to me like that": "snaps back",
    "Nobody asked you": "snaps back",
}

FIRST_NAMES = ["Tom", "Mary", "Jack", "Lucy", "David", "Emma", "Peter", "Linda", "Steven", "Kate", "Bill", "Jenny"]
SURNAMES = ["Smith", "Brown", "Green", "White", "Johnson", "Wang", "Lee", "Taylor", "Miller", "Clark"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "March", "April", "May", "June", "July", "August", "September", "October", "December"]
CLOCK_TIMES = ["7:30", "8 o'clock", "9:15", "10:30", "noon", "2 pm", "3:30", "5 pm", "6:30", "7 pm", "8:45"]

# Neutral small talk: pairs of (question, answer) that add length without changing the summary.
SMALL_TALK = [
    ("How have you been lately?", "Pretty good, thanks. Work has been busy, but I can't complain."),
    ("Nice weather today, isn't it?", "Yes, it's sunny and warm. I hope it stays like this all week."),
    ("Did you have a good weekend?", "It was quiet. I stayed at home and read a book."),
    ("Have you been waiting long?", "No, I just got here a few minutes ago."),
    ("Is this your first time here?", "No, I've been here a couple of times before."),
    ("How is your family doing?", "Everyone is fine, thank you for asking."),
    ("Did you watch the game last night?", "I did. It was exciting until the very last minute."),
    ("The traffic was terrible this morning, wasn't it?", "It was. It took me almost an hour to get here."),
    ("Do you live near here?", "Yes, just ten minutes away on foot."),
    ("Are you busy these days?", "A little. I have a lot of reports to finish this month."),
    ("Have you tried the new cafe on the corner?", "Not yet, but I heard their coffee is really good."),
    ("Is it going to rain later?", "The forecast says it might, so I brought an umbrella."),
    ("How long have you lived in this city?", "About five years now. I really like it here."),
    ("Do you have any plans for the holidays?", "I might visit my parents in the countryside."),
    ("Sorry, could you speak a little louder?", "Of course. Is this better?"),
    ("Would you like something to drink first?", "Just a glass of water, please."),
]

# ----------------------------------------------------------------------------------------------------
# Scenarios

Turn = tuple[str, str]  # (role "A" or "B", text); roles become #Person1#/#Person2# by who speaks first


@dataclass
class Scenario:
    """One conversation before formatting: alternating turns and three paraphrased summaries.

    Summaries use `{A}` and `{B}` for the two roles; they are filled in once it is known who speaks first.
    """

    topic: str
    turns: list[Turn]
    summaries: list[str]


def _a(word: str) -> str:
    """The indefinite article a word takes ("an idiot", "a useless liar")."""
    return "an" if word[0] in "aeio" else "a"


def _opener(rng: random.Random, a_first: str, b_first: str) -> list[Turn]:
    """Either role may open the conversation, so #Person1# is not always the same role."""
    return [("A", a_first)] if rng.random() < 0.5 else [("B", b_first), ("A", a_first)]


def _shopping(rng: random.Random) -> Scenario:
    color = rng.choice(["red", "blue", "black", "white", "green", "yellow", "grey", "brown"])
    item = rng.choice(["jacket", "sweater", "dress", "shirt", "coat", "handbag", "scarf", "watch", "backpack"])
    price = rng.randrange(40, 201, 10)
    discount = rng.choice([10, 20, 30])
    final = price * (100 - discount) // 100
    payment = rng.choice(["credit card", "cash", "check"])
    turns = _opener(rng, f"Excuse me, do you have this {item} in {color}?", "Good afternoon. Can I help you?")
    turns += [
        ("B", "Yes, we do. What size do you need?"),
        ("A", "Medium, please. How much is it?"),
        ("B", f"It's {price} dollars."),
        ("A", "That's a bit expensive. Could you give me a discount?"),
        ("B", f"Since it's the end of the season, I can give you {discount} percent off. That makes it {final} dollars."),
        ("A", f"Great, I'll take it. Can I pay by {payment}?"),
        ("B", f"Sure, {payment} is fine."),
    ]
    return Scenario("shopping", turns, [
        f"{{A}} wants to buy a {color} {item}. {{B}} gives {{A}} {discount} percent off, so it costs {final} dollars "
        f"and {{A}} pays by {payment}.",
        f"{{A}} buys a {color} {item} for {final} dollars after a {discount} percent discount and pays by {payment}.",
        f"{{B}} helps {{A}} buy a {color} {item}. With the discount it costs {final} dollars.",
    ])


def _doctor(rng: random.Random) -> Scenario:
    symptom = rng.choice(["a headache", "a sore throat", "a bad cough", "a fever", "a stomachache", "back pain"])
    days = rng.randint(2, 7)
    doctor = rng.choice(SURNAMES)
    medicine = rng.choice(["some pills", "cough syrup", "antibiotics", "painkillers", "vitamins"])
    advice = rng.choice(["drink plenty of water", "stay in bed", "avoid cold drinks", "get more sleep", "eat light food"])
    back = rng.randint(2, 5)
    turns = _opener(rng, "Good morning, doctor. I don't feel well.", "Good morning. What seems to be the problem?")
    turns += [
        ("B", "I'm sorry to hear that. What's wrong?"),
        ("A", f"I've had {symptom} for {days} days."),
        ("B", "Let me have a look. Do you have any other symptoms?"),
        ("A", "I feel tired and I can't sleep well."),
        ("B", f"It's nothing serious. I'll give you {medicine}. Take them three times a day."),
        ("A", "Is there anything else I should do?"),
        ("B", f"You should {advice}. Come back in {back} days if you don't feel better."),
        ("A", f"Thank you, Dr. {doctor}."),
    ]
    return Scenario("see a doctor", turns, [
        f"{{A}} has had {symptom} for {days} days. Dr. {doctor} gives {{A}} {medicine} and tells {{A}} to {advice}.",
        f"Dr. {doctor} examines {{A}}, who has {symptom}, prescribes {medicine} and advises {{A}} to {advice}.",
        f"{{A}} sees Dr. {doctor} about {symptom}. {{A}} gets {medicine} and should come back in {back} days "
        f"if it does not get better.",
    ])


def _interview(rng: random.Random) -> Scenario:
    position = rng.choice(["sales manager", "accountant", "software engineer", "secretary", "teacher", "designer"])
    company = rng.choice(["Green Tech", "Blue Ocean Trading", "Sunrise Media", "Star Electronics", "Golden Gate Foods"])
    years = rng.randint(2, 10)
    city = rng.choice(["Boston", "Chicago", "Shanghai", "Toronto", "Seattle", "Denver"])
    salary = rng.randrange(3000, 8001, 500)
    day = rng.choice(DAYS[:5])
    turns = _opener(rng, f"Good morning. I'm here for the interview for the {position} position.",
                    f"Welcome to {company}. Please have a seat.")
    turns += [
        ("B", f"Nice to meet you. Why do you want to work for {company}?"),
        ("A", "I think your company is growing fast and I can learn a lot here."),
        ("B", "How much experience do you have?"),
        ("A", f"I have worked as a {position} for {years} years at a company in {city}."),
        ("B", "What salary do you expect?"),
        ("A", f"I hope to earn about {salary} dollars a month."),
        ("B", "That sounds reasonable. When can you start?"),
        ("A", f"I can start next {day}."),
    ]
    return Scenario("job interview", turns, [
        f"{{B}} interviews {{A}} for the {position} position at {company}. {{A}} has {years} years of experience, "
        f"expects {salary} dollars a month and can start on {day}.",
        f"{{A}} applies to be a {position} at {company}, has worked in {city} for {years} years and can start next {day}.",
        f"{{A}} has a job interview with {{B}}. {{A}} wants {salary} dollars a month as a {position}.",
    ])


def _restaurant(rng: random.Random) -> Scenario:
    people = rng.randint(2, 8)
    time = rng.choice(CLOCK_TIMES[6:])
    dish = rng.choice(["steak", "roast chicken", "seafood pasta", "vegetable soup", "fried rice", "salmon"])
    drink = rng.choice(["orange juice", "red wine", "iced tea", "coffee", "lemonade"])
    dessert = rng.choice(["chocolate cake", "apple pie", "ice cream", "cheesecake"])
    turns = _opener(rng, f"Hello, I'd like a table for {people}, please.", "Good evening. Welcome to our restaurant.")
    turns += [
        ("B", f"Of course. A table for {people} at {time}. This way, please. Here is the menu."),
        ("A", "Thank you. What do you recommend?"),
        ("B", f"The {dish} is very popular tonight."),
        ("A", f"Then I'll have the {dish}, and a glass of {drink}, please."),
        ("B", "Anything for dessert?"),
        ("A", f"Yes, the {dessert}, please."),
        ("B", "Very good. It will be ready in about twenty minutes."),
    ]
    return Scenario("restaurant", turns, [
        f"{{A}} gets a table for {people} at {time} and orders the {dish}, a glass of {drink} and the {dessert}.",
        f"{{B}} recommends the {dish}, so {{A}} orders it with {drink} and has {dessert} for dessert.",
        f"{{A}} has dinner for {people} at {time}: the {dish} with {drink}, then the {dessert}.",
    ])


def _travel(rng: random.Random) -> Scenario:
    city = rng.choice(["Paris", "Tokyo", "New York", "London", "Sydney", "Beijing", "Rome", "Bangkok", "Madrid"])
    day = rng.choice(DAYS)
    seat = rng.choice(["economy", "business"])
    trip = rng.choice(["one-way", "round-trip"])
    price = rng.randrange(300, 2001, 50)
    time = rng.choice(CLOCK_TIMES)
    turns = _opener(rng, f"Hi, I'd like to book a flight to {city}.", "Good morning, City Travel Agency.")
    turns += [
        ("B", "Certainly. When would you like to leave?"),
        ("A", f"This {day}, if possible."),
        ("B", f"There is a flight at {time}. Would you like economy or business class?"),
        ("A", f"{seat.capitalize()}, please. A {trip} ticket."),
        ("B", f"That will be {price} dollars."),
        ("A", "Fine. Please book it for me."),
        ("B", f"Done. Please be at the airport two hours before {time}."),
    ]
    return Scenario("travel", turns, [
        f"{{A}} books a {trip} {seat} ticket to {city} for {day}. It costs {price} dollars and the flight leaves at {time}.",
        f"{{B}} books {{A}} {_a(seat)} {seat} flight to {city} on {day} at {time} for {price} dollars.",
        f"{{A}} will fly to {city} on {day}. The {trip} ticket costs {price} dollars.",
    ])


# A neighbour's problem and what the other neighbour promises to do about it.
NEIGHBOUR_PROBLEMS = [
    ("loud music", "turn the music down"),
    ("barking dog", "keep the dog inside"),
    ("car blocking the driveway", "move the car"),
    ("smoke from the barbecue", "cook somewhere else"),
    ("noisy party", "end the party earlier"),
    ("rubbish in the hallway", "take the rubbish out"),
]


def _neighbours(rng: random.Random) -> Scenario:
    problem, fix = rng.choice(NEIGHBOUR_PROBLEMS)
    when = rng.choice(["late at night", "early in the morning", "every weekend", "all afternoon"])
    name = rng.choice(SURNAMES)
    gift = rng.choice(["some cookies", "a bottle of wine", "some fruit", "a cake"])
    turns = _opener(rng, f"Hello, Mr. {name}. Do you have a minute?", "Oh, hello. Can I help you with something?")
    turns += [
        ("B", "Sure, what's the matter?"),
        ("A", f"I'm sorry to bother you, but the {problem} is really bothering my family {when}."),
        ("B", "Oh, I didn't realize that. I'm very sorry."),
        ("A", "We have a baby who needs to sleep, you see."),
        ("B", f"I understand. I promise I will {fix} from now on."),
        ("A", "Thank you, I really appreciate it."),
        ("B", f"Please take {gift} as an apology."),
    ]
    return Scenario("neighbours", turns, [
        f"{{A}} complains to Mr. {name} about the {problem} {when}. {{B}} apologizes and promises to {fix}.",
        f"{{B}} agrees to {fix} after {{A}} complains about the {problem}, and gives {{A}} {gift}.",
        f"{{A}} tells the neighbour that the {problem} bothers the family {when}. {{B}} will {fix}.",
    ])


def _renting(rng: random.Random) -> Scenario:
    rooms = rng.choice(["one-bedroom", "two-bedroom", "three-bedroom"])
    area = rng.choice(["downtown", "near the university", "by the park", "close to the station"])
    rent = rng.randrange(600, 2001, 50)
    included = rng.choice(["water", "internet", "heating", "electricity"])
    month = rng.choice(MONTHS)
    turns = _opener(rng, f"Hi, I'm calling about the {rooms} apartment {area}.", "Hello, Sunny Homes, how can I help?")
    turns += [
        ("B", "Yes, it's still available. It's quiet and has a lot of light."),
        ("A", "How much is the rent?"),
        ("B", f"It's {rent} dollars a month, and that includes {included}."),
        ("A", "That sounds good. When can I move in?"),
        ("B", f"It will be ready at the beginning of {month}."),
        ("A", "Perfect. I'd like to sign the lease."),
        ("B", "Great. Please bring your ID and the first month's rent."),
    ]
    return Scenario("renting", turns, [
        f"{{A}} wants to rent a {rooms} apartment {area}. The rent is {rent} dollars a month including {included}, "
        f"and {{A}} will move in in {month}.",
        f"{{A}} agrees to rent {{B}}'s {rooms} apartment {area} for {rent} dollars a month from {month}.",
        f"{{B}} tells {{A}} the {rooms} apartment costs {rent} dollars with {included} and is ready in {month}.",
    ])


def _weekend(rng: random.Random) -> Scenario:
    activity = rng.choice(["see a movie", "go hiking", "play tennis", "visit the museum", "have a picnic", "go swimming"])
    day = rng.choice(["Saturday", "Sunday"])
    time = rng.choice(CLOCK_TIMES[:8])
    place = rng.choice(["at the station", "in front of the library", "at the coffee shop", "at the park gate"])
    friend = rng.choice(FIRST_NAMES)
    turns = _opener(rng, f"Are you free this {day}? Would you like to {activity}?", "Hey, what are you doing?")
    turns += [
        ("B", "I'd love to. What time?"),
        ("A", f"How about {time}?"),
        ("B", f"{time.capitalize()} is fine. Where shall we meet?"),
        ("A", f"Let's meet {place}."),
        ("B", f"OK. Can I bring {friend}? {friend} has wanted to {activity} for ages."),
        ("A", "Of course, the more the merrier."),
    ]
    return Scenario("plan", turns, [
        f"{{A}} invites {{B}} to {activity} on {day}. They will meet {place} at {time} and {{B}} will bring {friend}.",
        f"{{A}} and {{B}} will {activity} on {day} at {time}, meeting {place}, together with {friend}.",
        f"{{B}} agrees to {activity} with {{A}} this {day} and asks to bring {friend}.",
    ])


def _hotel(rng: random.Random) -> Scenario:
    name = rng.choice(SURNAMES)
    nights = rng.randint(2, 6)
    room_type = rng.choice(["single", "double", "twin", "family"])
    room = rng.randrange(101, 921)
    breakfast = rng.choice(["6:30", "7 o'clock", "7:30"])
    turns = _opener(rng, f"Hello, I have a reservation under the name {name}.", "Good evening, welcome to the Grand Hotel.")
    turns += [
        ("B", f"Let me check. Yes, a {room_type} room for {nights} nights. May I see your passport?"),
        ("A", "Here you are. Is breakfast included?"),
        ("B", f"Yes, breakfast is served from {breakfast} in the restaurant on the first floor."),
        ("A", "Great. And is there free internet?"),
        ("B", f"Yes, the password is on your key card. You are in room {room}."),
        ("A", "Thank you very much."),
    ]
    return Scenario("hotel", turns, [
        f"{{A}} checks in for {nights} nights in a {room_type} room. {{B}} gives {{A}} room {room} and says "
        f"breakfast is served from {breakfast}.",
        f"{{A}}, whose name is {name}, stays in {room_type} room {room} for {nights} nights with breakfast from {breakfast}.",
        f"{{B}} checks {{A}} into room {room} for {nights} nights.",
    ])


TOPICS: list[Callable[[random.Random], Scenario]] = [
    _shopping, _doctor, _interview, _restaurant, _travel, _neighbours, _renting, _weekend, _hotel,
]


def _short(rng: random.Random) -> Scenario:
    """A two-turn exchange, well under MIN_CHARS."""
    item = rng.choice(["pen", "umbrella", "charger", "dictionary", "bike"])
    name = rng.choice(FIRST_NAMES)
    return Scenario("borrowing", [("A", f"Hi, {name}. Can I borrow your {item}?"), ("B", "Sure, here you are.")], [
        f"{{A}} borrows {{B}}'s {item}.",
        f"{{B}} lends {{A}} a {item}.",
        f"{{A}} asks to borrow a {item} and {{B}} agrees.",
    ])


# ----------------------------------------------------------------------------------------------------
# Heated turns and formatting


def _heat(rng: random.Random, scenario: Scenario) -> tuple[list[str], list[str]]:
    """Insert an exchange of insults; return (toxic, neutral) summary sentences about it."""
    at = rng.randint(1, len(scenario.turns) - 1)
    x = "B" if scenario.turns[at - 1][0] == "A" else "A"  # the insulter speaks next, keeping turns alternating
    y = "A" if x == "B" else "B"
    adj1, noun1 = rng.choice(INSULT_ADJECTIVES), rng.choice(INSULT_NOUNS)
    adj2, noun2 = rng.choice(INSULT_ADJECTIVES), rng.choice(INSULT_NOUNS)
    comeback = rng.choice(sorted(COMEBACKS))
    scenario.turns[at:at] = [
        (x, f"{rng.choice(OUTBURSTS)} You are {_a(adj1)} {adj1} {noun1}!"),
        (y, f"{comeback}, you {adj2} {noun2}."),
    ]
    X, Y = "{" + x + "}", "{" + y + "}"
    reply = COMEBACKS[comeback].replace("{X}", X)
    toxic = [
        f"{X} calls {Y} {_a(adj1)} {adj1} {noun1}, and {Y} calls {X} {_a(adj2)} {adj2} {noun2}.",
        f"{X} and {Y} insult each other: {X} says {Y} is {_a(adj1)} {adj1} {noun1}.",
        f"{Y} {reply} and calls {X} {_a(adj2)} {adj2} {noun2}.",
    ]
    neutral = [f"{X} and {Y} have a heated argument.", f"{X} and {Y} quarrel.", f"{X} gets angry with {Y}."]
    return toxic, neutral


def _pad(rng: random.Random, scenario: Scenario, pairs: int) -> None:
    """Add `pairs` small-talk exchanges before the conversation proper or at its end, interrupting nothing."""
    for question, answer in rng.sample(SMALL_TALK, pairs):
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
    summaries: tuple[str, ...]  # TEST_REFERENCES paraphrased references
    topic: str
    heated: bool


def make_dialogue(rng: random.Random) -> Dialogue:
    """One dialogue: in range 95% of the time, too short or too long otherwise; heated 20% of the time."""
    draw = rng.random()
    heated = rng.random() < HEATED_FRACTION
    for _ in range(1000):  # redraw until the length lands where this example was meant to be
        if draw < SHORT_FRACTION:
            scenario, pairs = _short(rng), 0
        else:
            scenario = rng.choice(TOPICS)(rng)
            pairs = rng.randint(8, 12) if draw < SHORT_FRACTION + LONG_FRACTION else rng.randint(0, 3)
        _pad(rng, scenario, pairs)
        extra: list[str] = []
        if heated:
            toxic, neutral = _heat(rng, scenario)
            extra = [toxic[k] if rng.random() < TOXIC_REFERENCE_FRACTION else neutral[k] for k in range(3)]
        names = _speakers(scenario.turns)
        text = "\n".join(f"{names[role]}: {line}" for role, line in scenario.turns)
        in_range = MIN_CHARS < len(text) <= MAX_CHARS
        wanted_in_range = draw >= SHORT_FRACTION + LONG_FRACTION
        if in_range == wanted_in_range:
            break
    else:
        raise RuntimeError("tiny_data templates cannot produce a dialogue of the wanted length; fix the templates")
    summaries = tuple(
        " ".join([s] + ([extra[k]] if extra else [])).format(A=names["A"], B=names["B"])
        for k, s in enumerate(scenario.summaries)
    )
    return Dialogue(text, summaries, scenario.topic, heated)


def make_split(split: str, seed: int) -> list[Dialogue]:
    rng = random.Random(f"{seed}-dialogsum-{split}")
    return [make_dialogue(rng) for _ in range(SPLIT_SIZES[split])]


def split_rows(split: str, dialogues: list[Dialogue], seed: int) -> list[dict[str, str]]:
    """Rows in the Hugging Face DialogSum layout: one per dialogue, or TEST_REFERENCES per test dialogue."""
    prefix = SPLIT_ID_PREFIX[split]
    if split == "test":
        return [
            {"id": f"{prefix}_{i}_{k + 1}", "dialogue": d.dialogue, "summary": d.summaries[k], "topic": d.topic}
            for i, d in enumerate(dialogues)
            for k in range(TEST_REFERENCES)
        ]
    # Train/validation have one reference each; mostly the first phrasing, so the mapping is easy to learn.
    rng = random.Random(f"{seed}-dialogsum-{split}-reference")
    return [
        {"id": f"{prefix}_{i}", "dialogue": d.dialogue, "topic": d.topic,
         "summary": d.summaries[rng.choices(range(TEST_REFERENCES), weights=[6, 2, 2])[0]]}
        for i, d in enumerate(dialogues)
    ]


def write_csv(path: Path, rows: Iterable[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------------------
# Toxicity set

# Insults phrased as summaries report them; also used inside longer toxic summaries.
TOXIC_SUMMARY_TEMPLATES = ["{X} calls {Y} {a} {adj} {noun}.", "{X} tells {Y} to shut up and calls {Y} {a} {noun}."]
TOXIC_TEMPLATES = TOXIC_SUMMARY_TEMPLATES + [
    "You are {a} {adj} {noun}.",
    "Shut up, you {adj} {noun}!",
    "Nobody cares what you think, you {adj} {noun}.",
    "What {a} {adj} {noun} you are.",
    "Get lost, you {adj} {noun}.",
    "You are so {adj}, I can't stand you.",
    "Stop talking, you {noun}. You make me sick.",
    "I hate you, you {adj} {noun}.",
]
NEUTRAL_TEMPLATES = [
    "You are {a} {adj} {noun}.",
    "Thank you so much, you are {a} {adj} {noun}.",
    "{X} calls {Y} {a} {adj} {noun}.",
    "What {a} {adj} {noun} you are.",
    "You are so {adj}, thank you for your help.",
    "{X} and {Y} have a heated argument.",
    "{X} and {Y} talk about the {noun}.",
    "{X} says {Y} is {a} {adj} {noun}.",
]


def _fill(template: str, rng: random.Random, adjectives: list[str], nouns: list[str]) -> str:
    adj, noun = rng.choice(adjectives), rng.choice(nouns)
    x, y = rng.sample(["#Person1#", "#Person2#"], 2)
    a = _a(adj) if "{a} {adj}" in template else _a(noun)
    return template.format(a=a, adj=adj, noun=noun, X=x, Y=y)


def _summary_sentence(rng: random.Random) -> str:
    """A neutral DialogSum-style summary sentence from one of the topics."""
    scenario = rng.choice(TOPICS)(rng)
    names = _speakers(scenario.turns)
    summary = rng.choice(scenario.summaries).format(A=names["A"], B=names["B"])
    # Split after a full stop, but not after the titles "Dr." and "Mr.".
    sentences = re.split(r"(?<!Dr\.)(?<!Mr\.)(?<=\.) ", summary)
    return rng.choice(sentences)


def make_toxicity_examples(seed: int) -> list[dict[str, str]]:
    """Unique labelled sentences, TOXICITY_PER_LABEL of each label, in a seeded random order."""
    rng = random.Random(f"{seed}-toxicity")
    makers = {
        "hate": lambda: (
            _fill(rng.choice(TOXIC_TEMPLATES), rng, INSULT_ADJECTIVES, INSULT_NOUNS)
            if rng.random() < 0.7
            # A toxic summary: an insult next to neutral content, as the heated references have.
            else f"{_summary_sentence(rng)} {_fill(rng.choice(TOXIC_SUMMARY_TEMPLATES), rng, INSULT_ADJECTIVES, INSULT_NOUNS)}"
        ),
        "nothate": lambda: (
            _summary_sentence(rng)
            if rng.random() < 0.6
            else _fill(rng.choice(NEUTRAL_TEMPLATES), rng, KIND_ADJECTIVES, KIND_NOUNS)
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
