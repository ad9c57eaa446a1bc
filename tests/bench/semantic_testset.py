"""A test set for the semantic cache, built by rules (no LLM) from the routing prompts.

Run ``python -m tests.bench.semantic_testset --show 3`` to print counts and examples.

Originals: ``n_prompts`` prompts (default 400) drawn with a fixed seed from
``../shared/data/routing/`` (``--data``): ``gsm8k_share`` of them from ``gsm8k_dev.jsonl``, the rest
from ``mmlu_dev.jsonl`` taken round-robin over its subjects (so every subject is
represented), duplicates removed. Each original gets ``per_prompt`` positive and
``per_prompt`` negative variants, chosen at random (seeded) among the transformations
that apply to it, rarer transformations first (weight 1 / how many originals it applies
to), so that every transformation gets examples. Also ``distractors`` other prompts
from the same files: entries in the simulated cache that a variant must not be
served from.

POSITIVE transformations: the answer stays the same, a semantic cache should hit.

* ``lowercase``: the whole prompt in lower case.
* ``whitespace``: two spaces after sentence ends, blank lines between lines, a
  leading space and a trailing newline.
* ``punctuation``: the question's final ``?`` removed (or a ``?`` added where it ends
  without one), and the first serial comma before "and"/"or" removed.
* ``prefix``: a polite or labelling prefix ("Please answer: ", "Question: ", "Q: ", ...).
* ``suffix``: a polite ending ("Thanks!", "Thank you.", ...); MMLU: after the stem,
  before the options.
* ``contraction``: one contraction applied or expanded everywhere
  ("do not" <-> "don't", "What is" <-> "What's", "cannot" <-> "can't", ...).
* ``synonym``: one safe rewording everywhere ("Which of the following" -> "Which one of
  the following", "Calculate" -> "Compute", "How many" -> "What number of",
  "Find" -> "Determine", "approximately" -> "roughly", "buys" -> "purchases", ...).
* ``filler``: a sentence that changes nothing added before the question and one after
  it ("I'm preparing for a test." ... "I'd appreciate the answer."), order kept.
* ``digits``: one small number written the other way ("3" <-> "three"), 2..12 only.
* ``option_format`` (MMLU): option labels "A. x" rewritten "(A) x" or "A) x".
* ``answer_cue`` (MMLU): the final "Answer:" dropped or written "The answer is:".
* ``combo``: two of the above (not ``combo``), one after the other.

NEGATIVE transformations: the answer changes, a semantic cache must not hit.

* ``number``: one number in the question (GSM8K: anywhere; MMLU: the stem) changed to
  n+1, n-1, 2n or n+10 (decimals: the last digit), formatted like the original.
* ``number_word``: one number word changed ("two" -> "three", "twice" -> "three times",
  "half" -> "a third", "double" -> "triple", "first" -> "second", ...).
* ``entity_person``: a first name (from a fixed list) swapped for another, every
  occurrence ("Josh" -> "Mark"). In GSM8K the final number stays, but the cached
  answer talks about the wrong person: counted as a must-not-hit.
* ``entity_place``: a country, US state, city, continent or nationality swapped for
  another of the same kind, every occurrence ("Texas" -> "Ohio", "French" -> "German").
* ``option_text`` (MMLU): one option's text changed: a number in it changed, or
  True/False flipped, or the text replaced by an option of another question.
* ``option_swap`` (MMLU): the texts of two options exchanged (the right letter moves).
* ``quote``: one word inside a quoted string replaced by another.
* ``unit``: one unit next to a number changed ("3 hours" -> "3 minutes",
  "325 kilometers" -> "325 miles", "$80" -> "£80", "200 GB" -> "200 MB", ...).
* ``negation``: the first auxiliary of the question sentence negated
  ("Which of the following is" -> "... isn't", "How many miles did Sam run" ->
  "... didn't Sam run"), or an existing "not"/"n't" removed.
* ``antonym``: a polarity word swapped in the question (most <-> least,
  largest <-> smallest, increase <-> decrease, before <-> after, true <-> false, ...).
* ``extra_question``: a second question appended ("... Another question: How ...?"), from
  a prompt outside the test set: the answer must now cover it. Nothing is replaced,
  so only the embedding (and the determinants the new question brings) can see it.
* ``content_word``: one content word (5+ letters, not a stop word) of the question
  sentence replaced by a content word (same crude ending: -ing, -tion, -ed, -ly, -s or
  none) taken from prompts outside the test set. This edit has no number, name or option
  in it: only the embedding and the guard's ``lexical`` rule (added after this was
  measured) can see it.

Hand-written pairs (``PARAPHRASES``, ``NEAR_MISSES``, 30 each): short chat questions
reworded with other words, or changed by one word, as a check on the rules above.

Each variant records its original's id; ``Variant.detail`` says what was changed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "routing"


@dataclass(frozen=True, slots=True)
class Original:
    id: int
    source: str
    prompt: str


@dataclass(frozen=True, slots=True)
class Variant:
    original_id: int
    positive: bool
    transform: str
    text: str
    detail: str = ""


@dataclass(slots=True)
class TestSet:
    originals: list[Original]
    variants: list[Variant]
    distractors: list[str]
    seed: int
    applicable: dict[str, int] = field(default_factory=dict)
    """How many originals each transformation applies to."""

    def summary(self) -> dict[str, object]:
        pos = Counter(v.transform for v in self.variants if v.positive)
        neg = Counter(v.transform for v in self.variants if not v.positive)
        return {
            "originals": len(self.originals),
            "gsm8k": sum(o.source == "gsm8k" for o in self.originals),
            "mmlu": sum(o.source.startswith("mmlu") for o in self.originals),
            "mmlu_subjects": len({o.source for o in self.originals if o.source.startswith("mmlu")}),
            "positives": sum(pos.values()),
            "negatives": sum(neg.values()),
            "distractors": len(self.distractors),
            "positive_by_transform": dict(sorted(pos.items())),
            "negative_by_transform": dict(sorted(neg.items())),
            "seed": self.seed,
        }


# --------------------------------------------------------------------------- parsing

_OPTION_LINE = re.compile(r"^([A-J])\. (.*)$")


def split_mmlu(prompt: str) -> tuple[str, list[tuple[str, str]], str] | None:
    """(stem, [(letter, text)], tail) for an MMLU prompt: the options are the block of
    "A. ..." lines at its end (before a final "Answer:"); None when there is no such block."""
    lines = prompt.split("\n")
    tail = lines[-1] if lines[-1].strip() == "Answer:" else ""
    body = lines[:-1] if tail else lines
    start = len(body)
    while start > 0 and _OPTION_LINE.match(body[start - 1]):
        start -= 1
    while start < len(body) and not body[start].startswith("A. "):
        start += 1
    block = [_OPTION_LINE.match(line) for line in body[start:]]
    if len(block) < 2 or start == 0:
        return None
    options = [(m.group(1), m.group(2)) for m in block if m]
    return "\n".join(body[:start]), options, tail


def join_mmlu(stem: str, options: list[tuple[str, str]], tail: str, fmt: str = "{}. {}") -> str:
    lines = [stem] + [fmt.format(letter, text) for letter, text in options]
    if tail:
        lines.append(tail)
    return "\n".join(lines)


def _is_mmlu(o: Original) -> bool:
    return o.source.startswith("mmlu")


def _question_part(o: Original) -> tuple[str, Callable[[str], str]]:
    """The part a question edit applies to (MMLU: the stem) and how to put it back."""
    if _is_mmlu(o):
        parts = split_mmlu(o.prompt)
        if parts is not None:
            stem, options, tail = parts
            return stem, lambda s: join_mmlu(s, options, tail)
    return o.prompt, lambda s: s


def _last_sentence_span(text: str) -> tuple[int, int]:
    """The span of the question sentence: the last sentence with a '?', else the last one."""
    starts = [0] + [m.end() for m in re.finditer(r"[.!?]\s+|\n", text)]
    spans = [(s, e) for s, e in zip(starts, [*starts[1:], len(text)], strict=True) if text[s:e].strip()]
    if not spans:
        return 0, len(text)
    for s, e in reversed(spans):
        if "?" in text[s:e]:
            return s, e
    return spans[-1]


def _match_case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _sub_word(text: str, word: str, new: str, count: int = 0) -> str:
    return re.sub(rf"\b{re.escape(word)}\b", lambda m: _match_case(new, m.group(0)), text, count=count)


# ----------------------------------------------------------------- positive rewrites

Rewrite = Callable[[Original, random.Random], tuple[str, str] | None]

PREFIXES = ["Please answer: ", "Question: ", "Q: ", "Quick question: ", "Can you help me with this? ",
            "Here is a question. ", "Please solve this: "]  # fmt: skip
SUFFIXES = [" Thanks!", "\nThank you.", " Thanks in advance.", " Please answer."]
FILLERS = [("I'm preparing for a test. ", " I'd appreciate the answer."),
           ("This came up while I was studying. ", " Thank you for your help."),
           ("I have been wondering about this. ", " Let me know what you think.")]  # fmt: skip
CONTRACTIONS = [("do not", "don't"), ("does not", "doesn't"), ("did not", "didn't"), ("is not", "isn't"),
                ("are not", "aren't"), ("was not", "wasn't"), ("were not", "weren't"), ("cannot", "can't"),
                ("will not", "won't"), ("would not", "wouldn't"), ("should not", "shouldn't"),
                ("could not", "couldn't"), ("has not", "hasn't"), ("have not", "haven't"), ("What is", "What's"),
                ("what is", "what's"), ("it is", "it's"), ("It is", "It's"), ("that is", "that's"),
                ("there is", "there's"), ("I am", "I'm"), ("you are", "you're"), ("they are", "they're")]  # fmt: skip
SYNONYMS = [("Which of the following", "Which one of the following"),
            ("which of the following", "which one of the following"), ("Calculate", "Compute"),
            ("calculate", "compute"), ("How many", "What number of"), ("how many", "what number of"),
            ("Find", "Determine"), ("approximately", "roughly"), ("in total", "altogether"),
            ("Suppose", "Assume"), ("most likely", "most probably"), ("buys", "purchases"), ("bought", "purchased"),
            ("wants to", "would like to"), ("is known as", "is called")]  # fmt: skip
SMALL_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve"]  # fmt: skip


def p_lowercase(o: Original, rng: random.Random) -> tuple[str, str] | None:
    low = o.prompt.lower()
    return (low, "all lower case") if low != o.prompt else None


def p_whitespace(o: Original, rng: random.Random) -> tuple[str, str] | None:
    text = re.sub(r"([.?!]) (?=\S)", r"\1  ", o.prompt)
    text = " " + text.replace("\n", "\n\n") + "\n"
    return text, "double spaces, blank lines, leading space, trailing newline"


def p_punctuation(o: Original, rng: random.Random) -> tuple[str, str] | None:
    part, put_back = _question_part(o)
    stripped = part.rstrip()
    changed = []
    if stripped.endswith("?"):
        part = stripped[:-1]
        changed.append("final ? removed")
    elif stripped and stripped[-1].isalnum():
        part = stripped + "?"
        changed.append("final ? added")
    new, n = re.subn(r", (and|or) ", r" \1 ", part, count=1)
    if n:
        part = new
        changed.append("serial comma removed")
    return (put_back(part), ", ".join(changed)) if changed else None


def p_prefix(o: Original, rng: random.Random) -> tuple[str, str] | None:
    prefix = rng.choice(PREFIXES)
    return prefix + o.prompt, repr(prefix)


def p_suffix(o: Original, rng: random.Random) -> tuple[str, str] | None:
    suffix = rng.choice(SUFFIXES)
    part, put_back = _question_part(o)
    return put_back(part + suffix), repr(suffix)


def p_contraction(o: Original, rng: random.Random) -> tuple[str, str] | None:
    choices = []
    for long, short in CONTRACTIONS:
        if re.search(rf"\b{re.escape(long)}\b", o.prompt):
            choices.append((long, short))
        if re.search(rf"\b{re.escape(short)}(?!\w)", o.prompt):
            choices.append((short, long))
    if not choices:
        return None
    old, new = rng.choice(choices)
    return re.sub(rf"\b{re.escape(old)}(?!\w)", new, o.prompt), f"{old!r} -> {new!r}"


def p_synonym(o: Original, rng: random.Random) -> tuple[str, str] | None:
    choices = [(a, b) for a, b in SYNONYMS if re.search(rf"\b{re.escape(a)}\b", o.prompt)]
    if not choices:
        return None
    old, new = rng.choice(choices)
    return re.sub(rf"\b{re.escape(old)}\b", new, o.prompt), f"{old!r} -> {new!r}"


def p_filler(o: Original, rng: random.Random) -> tuple[str, str] | None:
    before, after = rng.choice(FILLERS)
    part, put_back = _question_part(o)
    return put_back(before + part + after), repr(before.strip()) + " ... " + repr(after.strip())


def p_digits(o: Original, rng: random.Random) -> tuple[str, str] | None:
    choices = []
    for value in range(2, 13):
        word = SMALL_NUMBERS[value]
        for m in re.finditer(rf"\b{word}\b", o.prompt, flags=re.I):
            choices.append((m.start(), m.end(), str(value)))
        for m in re.finditer(rf"(?<![\w.,$/^-]){value}(?![\w.,%/^]|\.\d)", o.prompt):
            choices.append((m.start(), m.end(), word))
    if not choices:
        return None
    start, end, new = rng.choice(choices)
    old = o.prompt[start:end]
    return o.prompt[:start] + _match_case(new, old) + o.prompt[end:], f"{old!r} -> {new!r}"


def p_option_format(o: Original, rng: random.Random) -> tuple[str, str] | None:
    parts = split_mmlu(o.prompt) if _is_mmlu(o) else None
    if parts is None:
        return None
    fmt = rng.choice(["({}) {}", "{}) {}"])
    return join_mmlu(*parts, fmt=fmt), fmt.format("A", "...")


def p_answer_cue(o: Original, rng: random.Random) -> tuple[str, str] | None:
    if not _is_mmlu(o) or not o.prompt.rstrip().endswith("Answer:"):
        return None
    base = o.prompt.rstrip()[: -len("Answer:")].rstrip("\n")
    if rng.random() < 0.5:
        return base, "'Answer:' dropped"
    return base + "\nThe answer is:", "'Answer:' -> 'The answer is:'"


POSITIVE: dict[str, Rewrite] = {
    "lowercase": p_lowercase, "whitespace": p_whitespace, "punctuation": p_punctuation, "prefix": p_prefix,
    "suffix": p_suffix, "contraction": p_contraction, "synonym": p_synonym, "filler": p_filler,
    "digits": p_digits, "option_format": p_option_format, "answer_cue": p_answer_cue,
}  # fmt: skip


def p_combo(o: Original, rng: random.Random) -> tuple[str, str] | None:
    names = [n for n, f in POSITIVE.items() if n != "combo" and f(o, random.Random(0)) is not None]
    if len(names) < 2:
        return None
    first, second = rng.sample(names, 2)
    a = POSITIVE[first](o, rng)
    assert a is not None
    b = POSITIVE[second](Original(o.id, o.source, a[0]), rng)
    if b is None:
        return None
    return b[0], f"{first} ({a[1]}) + {second} ({b[1]})"


POSITIVE["combo"] = p_combo

# ----------------------------------------------------------------- negative rewrites

PERSON_NAMES = ["James", "John", "Robert", "Michael", "William", "David", "Richard", "Joseph", "Thomas", "Charles", "Christopher", "Daniel", "Matthew", "Anthony", "Mark", "Donald", "Steven", "Paul", "Andrew", "Joshua", "Kenneth", "Kevin", "Brian", "George", "Timothy", "Ronald", "Edward", "Jason", "Jeffrey", "Ryan", "Jacob", "Gary", "Nicholas", "Eric", "Jonathan", "Stephen", "Larry", "Justin", "Scott", "Brandon", "Benjamin", "Samuel", "Gregory", "Frank", "Alexander", "Raymond", "Patrick", "Jack", "Dennis", "Jerry", "Tyler", "Aaron", "Jose", "Adam", "Henry", "Nathan", "Douglas", "Zachary", "Peter", "Kyle", "Walter", "Ethan", "Jeremy", "Harold", "Carl", "Keith", "Roger", "Gerald", "Christian", "Terry", "Sean", "Arthur", "Austin", "Noah", "Lawrence", "Jesse", "Joe", "Bryan", "Billy", "Jordan", "Albert", "Dylan", "Bruce", "Willie", "Gabriel", "Alan", "Juan", "Logan", "Wayne", "Ralph", "Roy", "Eugene", "Randy", "Vincent", "Russell", "Louis", "Philip", "Bobby", "Johnny", "Bradley", "Josh", "Tom", "Tim", "Ben", "Sam", "Max", "Jim", "Bob", "Dan", "Mike", "Tony", "Luke", "Leo", "Oliver", "Liam", "Lucas", "Mason", "Owen", "Carlos", "Ali", "Ahmed", "Mohamed", "Hassan", "Kim", "Raj", "Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Sarah", "Karen", "Lisa", "Nancy", "Betty", "Margaret", "Sandra", "Ashley", "Kimberly", "Emily", "Donna", "Michelle", "Carol", "Amanda", "Dorothy", "Melissa", "Deborah", "Stephanie", "Rebecca", "Sharon", "Laura", "Cynthia", "Kathleen", "Amy", "Angela", "Shirley", "Anna", "Brenda", "Pamela", "Emma", "Nicole", "Helen", "Samantha", "Katherine", "Christine", "Debra", "Rachel", "Carolyn", "Janet", "Catherine", "Maria", "Heather", "Diane", "Ruth", "Julie", "Olivia", "Joyce", "Virginia", "Victoria", "Kelly", "Lauren", "Christina", "Joan", "Evelyn", "Judith", "Megan", "Andrea", "Cheryl", "Hannah", "Jacqueline", "Martha", "Gloria", "Teresa", "Ann", "Sara", "Madison", "Frances", "Kathryn", "Janice", "Jean", "Abigail", "Alice", "Judy", "Sophia", "Grace", "Denise", "Amber", "Doris", "Marilyn", "Danielle", "Beverly", "Isabella", "Theresa", "Diana", "Natalie", "Brittany", "Charlotte", "Marie", "Kayla", "Alexis", "Lori", "Carla", "Eliza", "Jane", "Kate", "Lily", "Mia", "Ella", "Chloe", "Zoe", "Ava", "Jenny", "Lucy", "Julia", "Tina", "Rosa", "Gina", "Nina", "Lena", "Sofia", "Aisha", "Fatima", "Mei", "Yuki", "Priya"]  # fmt: skip
PLACES = {
    "country": [
        "France",
        "Germany",
        "Italy",
        "Spain",
        "Portugal",
        "Canada",
        "Mexico",
        "Brazil",
        "Argentina",
        "Chile",
        "Peru",
        "China",
        "Japan",
        "Korea",
        "India",
        "Pakistan",
        "Russia",
        "Ukraine",
        "Poland",
        "Sweden",
        "Norway",
        "Denmark",
        "Finland",
        "Egypt",
        "Nigeria",
        "Kenya",
        "Ethiopia",
        "Australia",
        "Greece",
        "Turkey",
        "Iran",
        "Iraq",
        "Israel",
        "Vietnam",
        "Thailand",
        "Indonesia",
        "Ireland",
        "England",
        "Scotland",
        "Britain",
        "Netherlands",
        "Belgium",
        "Switzerland",
        "Austria",
        "Cuba",
        "Colombia",
        "Venezuela",
        "Philippines",
    ],
    "state": [
        "Texas",
        "California",
        "Florida",
        "Ohio",
        "Georgia",
        "Virginia",
        "Michigan",
        "Illinois",
        "Arizona",
        "Colorado",
        "Oregon",
        "Nevada",
        "Utah",
        "Iowa",
        "Kansas",
        "Kentucky",
        "Alabama",
        "Louisiana",
        "Maryland",
        "Massachusetts",
        "Minnesota",
        "Missouri",
        "Montana",
        "Nebraska",
        "Oklahoma",
        "Pennsylvania",
        "Tennessee",
        "Washington",
        "Wisconsin",
        "Idaho",
        "Maine",
        "Vermont",
        "Alaska",
        "Hawaii",
        "Arkansas",
        "Connecticut",
        "Delaware",
        "Indiana",
        "Mississippi",
        "Wyoming",
    ],
    "city": [
        "London",
        "Paris",
        "Berlin",
        "Rome",
        "Madrid",
        "Tokyo",
        "Beijing",
        "Moscow",
        "Chicago",
        "Boston",
        "Seattle",
        "Toulouse",
        "Charleston",
        "Denver",
        "Dallas",
        "Houston",
        "Atlanta",
        "Miami",
        "Toronto",
        "Sydney",
        "Dublin",
        "Vienna",
        "Prague",
        "Athens",
        "Cairo",
        "Delhi",
        "Mumbai",
        "Shanghai",
        "Lagos",
        "Nairobi",
        "Philadelphia",
        "Detroit",
        "Phoenix",
        "Portland",
        "Vancouver",
        "Montreal",
        "Amsterdam",
        "Brussels",
        "Lisbon",
        "Stockholm",
        "Oslo",
        "Helsinki",
        "Warsaw",
        "Istanbul",
        "Baghdad",
        "Jerusalem",
        "Geneva",
        "Venice",
        "Florence",
        "Naples",
        "Milan",
        "Munich",
        "Hamburg",
        "Manchester",
        "Liverpool",
        "Oxford",
        "Cambridge",
    ],
    "continent": ["Africa", "Asia", "Europe", "Antarctica", "Australia"],
    "nationality": [
        "American",
        "British",
        "French",
        "German",
        "Italian",
        "Spanish",
        "Chinese",
        "Japanese",
        "Russian",
        "Indian",
        "Canadian",
        "Mexican",
        "Brazilian",
        "Greek",
        "Roman",
        "Egyptian",
        "Irish",
        "English",
        "Scottish",
        "Dutch",
        "Swedish",
        "Polish",
        "Turkish",
        "Korean",
        "Persian",
        "African",
        "European",
        "Asian",
        "Australian",
        "Israeli",
        "Arab",
        "Jewish",
        "Christian",
        "Muslim",
        "Catholic",
        "Protestant",
    ],
}
NUMBER_WORDS = {"two": "three", "three": "four", "four": "five", "five": "six", "six": "seven", "seven": "eight",
                "eight": "nine", "nine": "ten", "ten": "twelve", "eleven": "twelve", "twelve": "fifteen",
                "twenty": "thirty", "thirty": "forty", "fifty": "sixty", "hundred": "thousand",
                "thousand": "million", "twice": "three times", "half": "a third", "double": "triple",
                "triple": "double", "first": "second", "second": "third", "third": "fourth", "quarter": "third",
                "dozen": "hundred"}  # fmt: skip
UNITS = {"hours": "minutes", "hour": "minute", "minutes": "seconds", "minute": "second", "seconds": "minutes",
         "days": "weeks", "day": "week", "weeks": "months", "week": "month", "months": "years", "month": "year",
         "years": "decades", "year": "decade", "miles": "kilometers", "mile": "kilometer",
         "kilometers": "miles", "km": "miles", "meters": "feet", "meter": "foot", "feet": "meters", "foot": "meter",
         "inches": "centimeters", "inch": "centimeter", "cm": "mm", "mm": "cm", "pounds": "kilograms",
         "pound": "kilogram", "kg": "lb", "grams": "ounces", "gram": "ounce", "ounces": "grams", "liters": "gallons",
         "gallons": "liters", "gallon": "liter", "GB": "MB", "MB": "KB", "mph": "km/h", "cents": "dollars",
         "dollars": "euros", "degrees": "radians", "yards": "meters", "$": "£", "€": "$", "£": "$"}  # fmt: skip
ANTONYMS = [("most", "least"), ("largest", "smallest"), ("greatest", "smallest"), ("maximum", "minimum"),
            ("highest", "lowest"), ("increase", "decrease"), ("increases", "decreases"), ("increased", "decreased"),
            ("before", "after"), ("true", "false"), ("correct", "incorrect"), ("best", "worst"),
            ("longest", "shortest"), ("oldest", "youngest"), ("above", "below"), ("positive", "negative"),
            ("more", "less"), ("higher", "lower"), ("larger", "smaller"), ("strongest", "weakest"),
            ("faster", "slower"), ("accurate", "inaccurate"), ("likely", "unlikely"), ("always", "never"),
            ("minimum", "maximum"), ("early", "late"), ("earlier", "later"), ("inside", "outside")]  # fmt: skip
STOP = set(["about", "above", "after", "again", "against", "among", "because", "before", "being", "below", "between", "both", "could", "different", "does", "doing", "during", "either", "every", "first", "following", "further", "given", "great", "having", "however", "large", "later", "least", "little", "might", "might", "never", "other", "others", "people", "person", "picture", "rather", "really", "second", "several", "should", "since", "small", "something", "still", "their", "there", "these", "thing", "things", "think", "those", "though", "three", "through", "total", "under", "until", "using", "usually", "which", "while", "whose", "within", "without", "would", "years", "answer", "options", "option", "statement", "statements", "correct"])  # fmt: skip
QUOTE_WORDS = ["table", "river", "honest", "bright", "window", "garden", "silver", "market", "winter", "letter"]
_AUX = r"\b(is|are|was|were|does|do|did|can|could|should|would|will|has|have|must)\b"
_NEGATED = {"can": "can't", "will": "won't"}


def n_number(o: Original, rng: random.Random) -> tuple[str, str] | None:
    part, put_back = _question_part(o)
    found = list(re.finditer(r"(?<![A-Za-z_\d.,])\d+(?:,\d{3})*(?:\.\d+)?(?![\d])", part))
    if not found:
        return None
    m = rng.choice(found)
    old = m.group(0)
    if "." in old:
        head, digits = old.split(".")
        last = (int(digits[-1]) + rng.randint(1, 8)) % 10
        new = f"{head}.{digits[:-1]}{last}"
    else:
        n = int(old.replace(",", ""))
        choices = [n + 1, n * 2] + ([n - 1] if n > 1 else []) + ([n + 10] if n >= 10 else [])
        value = rng.choice([c for c in choices if c != n])
        new = f"{value:,}" if "," in old else str(value)
    return put_back(part[: m.start()] + new + part[m.end() :]), f"{old} -> {new}"


def n_number_word(o: Original, rng: random.Random) -> tuple[str, str] | None:
    part, put_back = _question_part(o)
    found = [(m, NUMBER_WORDS[m.group(0).lower()]) for m in re.finditer(r"\b[A-Za-z]+\b", part)
             if m.group(0).lower() in NUMBER_WORDS]  # fmt: skip
    if not found:
        return None
    m, new = rng.choice(found)
    new = _match_case(new, m.group(0))
    return put_back(part[: m.start()] + new + part[m.end() :]), f"{m.group(0)} -> {new}"


def _swap_entity(o: Original, rng: random.Random, lists: dict[str, list[str]]) -> tuple[str, str] | None:
    words = set(re.findall(r"\b[A-Z][a-z]+\b", o.prompt))
    found = [(w, kind) for kind, names in lists.items() for w in names if w in words]
    if not found:
        return None
    old, kind = rng.choice(sorted(found))
    new = rng.choice([w for w in lists[kind] if w != old and w not in words])
    return re.sub(rf"\b{old}\b", new, o.prompt), f"{old} -> {new} ({kind})"


def n_entity_person(o: Original, rng: random.Random) -> tuple[str, str] | None:
    return _swap_entity(o, rng, {"person": PERSON_NAMES})


def n_entity_place(o: Original, rng: random.Random) -> tuple[str, str] | None:
    return _swap_entity(o, rng, PLACES)


def n_option_text(o: Original, rng: random.Random, pool: list[str] | None = None) -> tuple[str, str] | None:
    parts = split_mmlu(o.prompt) if _is_mmlu(o) else None
    if parts is None:
        return None
    stem, options, tail = parts
    i = rng.randrange(len(options))
    letter, text = options[i]
    m = re.search(r"(?<![A-Za-z_\d.])\d+(?:\.\d+)?", text)
    if m:
        old = m.group(0)
        new = f"{old[:-1]}{(int(old[-1]) + 1) % 10}" if "." in old else str(int(old) + 1)
        new_text, how = text[: m.start()] + new + text[m.end() :], f"number {old} -> {new}"
    elif re.search(r"\b(True|False)\b", text):
        new_text = re.sub(r"\b(True|False)\b", lambda x: "False" if x.group(0) == "True" else "True", text, count=1)
        how = "True/False flipped"
    elif pool:
        new_text = rng.choice([p for p in pool if p != text])
        how = "replaced by another question's option"
    else:
        return None
    options = [*options[:i], (letter, new_text), *options[i + 1 :]]
    return join_mmlu(stem, options, tail), f"option {letter}: {how}"


def n_option_swap(o: Original, rng: random.Random) -> tuple[str, str] | None:
    parts = split_mmlu(o.prompt) if _is_mmlu(o) else None
    if parts is None:
        return None
    stem, options, tail = parts
    pairs = [(i, j) for i in range(len(options)) for j in range(i + 1, len(options)) if options[i][1] != options[j][1]]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    swapped = list(options)
    swapped[i], swapped[j] = (options[i][0], options[j][1]), (options[j][0], options[i][1])
    return join_mmlu(stem, swapped, tail), f"options {options[i][0]} and {options[j][0]} swapped"


_QUOTES = re.compile(r"\"([^\"\n]{2,200})\"|“([^”\n]{2,200})”|(?<!\w)'([^'\n]{2,200})'(?!\w)")


def n_quote(o: Original, rng: random.Random) -> tuple[str, str] | None:
    spans = []
    for m in _QUOTES.finditer(o.prompt):
        g = next(i for i in range(1, 4) if m.group(i) is not None)
        for w in re.finditer(r"[A-Za-z]{4,}", m.group(g)):
            if w.group(0).lower() in STOP:
                continue
            spans.append((m.start(g) + w.start(), m.start(g) + w.end()))
    if not spans:
        return None
    start, end = rng.choice(spans)
    old = o.prompt[start:end]
    new = _match_case(rng.choice([w for w in QUOTE_WORDS if w != old.lower()]), old)
    return o.prompt[:start] + new + o.prompt[end:], f"quoted {old!r} -> {new!r}"


def n_unit(o: Original, rng: random.Random) -> tuple[str, str] | None:
    part, put_back = _question_part(o)
    found = []
    for unit, new in UNITS.items():
        # a unit next to a number: "$80", "325 kilometers", "200 GB"
        pattern = rf"{re.escape(unit)}(?=\d)" if not unit.isalpha() else rf"(?<=\d )\b{unit}\b|(?<=\d){unit}\b"
        m = re.search(pattern, part)
        if m:
            found.append((m, new))
    if not found:
        return None
    m, new = rng.choice(sorted(found, key=lambda x: x[0].start()))
    return put_back(part[: m.start()] + new + part[m.end() :]), f"{m.group(0)} -> {new}"


def n_negation(o: Original, rng: random.Random) -> tuple[str, str] | None:
    part, put_back = _question_part(o)
    s, e = _last_sentence_span(part)
    sentence = part[s:e]
    m = re.search(_AUX + r" not\b", sentence, flags=re.I) or re.search(r"\bNOT\b", sentence)
    if m:
        new_sentence = sentence[: m.start()] + re.sub(r"\s*\bnot\b", "", m.group(0), flags=re.I) + sentence[m.end() :]
        how = "'not' removed"
    elif m := re.search(r"\b(\w+)n't\b", sentence):
        base = {"ca": "can", "wo": "will"}.get(m.group(1).lower(), m.group(1))
        new_sentence = sentence[: m.start()] + base + sentence[m.end() :]
        how = f"{m.group(0)!r} -> {base!r}"
    elif m := re.search(_AUX, sentence, flags=re.I):
        word = m.group(0)
        negated = _match_case(_NEGATED.get(word.lower(), word.lower() + "n't"), word)
        new_sentence = sentence[: m.start()] + negated + sentence[m.end() :]
        how = f"{word!r} -> {negated!r}"
    else:
        return None
    return put_back(part[:s] + new_sentence + part[e:]), how


def n_antonym(o: Original, rng: random.Random) -> tuple[str, str] | None:
    part, put_back = _question_part(o)
    pairs = ANTONYMS + [(b, a) for a, b in ANTONYMS]
    found = []
    for a, b in pairs:
        m = re.search(rf"\b{a}\b", part, flags=re.I)
        if m:
            found.append((m, b))
    if not found:
        return None
    m, new = rng.choice(sorted(found, key=lambda x: (x[0].start(), x[1])))
    new = _match_case(new, m.group(0))
    return put_back(part[: m.start()] + new + part[m.end() :]), f"{m.group(0)} -> {new}"


def _ending(word: str) -> str:
    """A crude word class, so that a replacement is more often the same part of speech."""
    return next((e for e in ("ing", "tion", "ed", "ly", "s") if word.endswith(e)), "")


def n_content_word(o: Original, rng: random.Random, pool: list[str] | None = None) -> tuple[str, str] | None:
    part, put_back = _question_part(o)
    s, e = _last_sentence_span(part)
    sentence = part[s:e]
    found = [m for m in re.finditer(r"\b[a-z]{5,}\b", sentence) if m.group(0) not in STOP]
    if not found or not pool:
        return None
    m = rng.choice(found)
    ending = _ending(m.group(0))
    new = rng.choice([w for w in pool if w != m.group(0) and _ending(w) == ending])
    new_sentence = sentence[: m.start()] + new + sentence[m.end() :]
    return put_back(part[:s] + new_sentence + part[e:]), f"{m.group(0)} -> {new}"


def n_extra_question(o: Original, rng: random.Random, pool: list[str] | None = None) -> tuple[str, str] | None:
    if not pool:
        return None
    part, put_back = _question_part(o)
    extra = rng.choice(pool)
    return put_back(part.rstrip() + " Another question: " + extra), repr(extra)


NEGATIVE: dict[str, Rewrite] = {
    "number": n_number, "number_word": n_number_word, "entity_person": n_entity_person,
    "entity_place": n_entity_place, "option_text": n_option_text, "option_swap": n_option_swap, "quote": n_quote,
    "unit": n_unit, "negation": n_negation, "antonym": n_antonym, "content_word": n_content_word,
    "extra_question": n_extra_question,
}  # fmt: skip

# ------------------------------------------------------------- hand-written pairs

# Short, chat-like questions, written by hand (not by the rules above), to check the
# rules' conclusions on real rewording: PARAPHRASES keep the answer with different
# words; NEAR_MISSES keep the wording and change the question (often one content word,
# which no determinant shows). They are a sanity check, not a statistic: 30 pairs each.
PARAPHRASES = [
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("How do I reverse a list in Python?", "How can I reverse a Python list?"),
    ("What is the boiling point of water at sea level?", "At sea level, at what temperature does water boil?"),
    ("Who wrote Pride and Prejudice?", "Who is the author of Pride and Prejudice?"),
    ("How many continents are there?", "What is the number of continents on Earth?"),
    ("What does HTTP stand for?", "What is HTTP short for?"),
    (
        "Explain the difference between a list and a tuple in Python.",
        "What's the difference between Python lists and tuples?",
    ),
    (
        "How do I convert a string to an integer in JavaScript?",
        "In JavaScript, how can I turn a string into an integer?",
    ),
    ("What is photosynthesis?", "Can you explain what photosynthesis is?"),
    ("What is the speed of light?", "How fast does light travel?"),
    ("Translate 'good morning' into Spanish.", "How do you say 'good morning' in Spanish?"),
    ("What causes the seasons on Earth?", "Why does Earth have seasons?"),
    ("How do I center a div in CSS?", "What's the best way to center a div using CSS?"),
    ("What is the largest planet in the solar system?", "Which planet in our solar system is the biggest?"),
    ("When did World War II end?", "In what year did the Second World War end?"),
    ("What is the square root of 144?", "What's the square root of 144?"),
    ("How many legs does a spider have?", "How many legs do spiders have?"),
    ("What is the chemical symbol for gold?", "Which chemical symbol does gold have?"),
    ("Who painted the Mona Lisa?", "Who was the painter of the Mona Lisa?"),
    ("What is the freezing point of water in Fahrenheit?", "At what Fahrenheit temperature does water freeze?"),
    ("How do I undo the last git commit?", "How can I revert my most recent git commit?"),
    ("What is machine learning?", "Could you explain what machine learning is?"),
    ("What is the tallest mountain in the world?", "Which mountain is the highest on Earth?"),
    ("What is the population of Tokyo?", "How many people live in Tokyo?"),
    ("How do I sort a dictionary by value in Python?", "How can I sort a Python dict by its values?"),
    ("What is the meaning of the word 'ubiquitous'?", "What does 'ubiquitous' mean?"),
    ("Give me a synonym for 'happy'.", "What is another word for 'happy'?"),
    ("What is the formula for the area of a circle?", "How do you calculate the area of a circle?"),
    ("Who was the first president of the United States?", "Who was the United States' first president?"),
    ("How many days are in a leap year?", "How many days does a leap year have?"),
]
NEAR_MISSES = [
    ("What is the capital of France?", "What is the population of France?"),
    ("How do I reverse a list in Python?", "How do I sort a list in Python?"),
    ("What is the boiling point of water at sea level?", "What is the freezing point of water at sea level?"),
    ("Who wrote Pride and Prejudice?", "Who wrote War and Peace?"),
    ("What does HTTP stand for?", "What does HTML stand for?"),
    (
        "Explain the difference between a list and a tuple in Python.",
        "Explain the difference between a list and a set in Python.",
    ),
    (
        "How do I convert a string to an integer in JavaScript?",
        "How do I convert an integer to a string in JavaScript?",
    ),
    ("What is the speed of light?", "What is the speed of sound?"),
    ("Translate 'good morning' into Spanish.", "Translate 'good morning' into French."),
    ("How do I center a div in CSS?", "How do I hide a div in CSS?"),
    ("What is the largest planet in the solar system?", "What is the smallest planet in the solar system?"),
    ("How many legs does a spider have?", "How many legs does an insect have?"),
    ("What is the chemical symbol for gold?", "What is the chemical symbol for silver?"),
    ("Who painted the Mona Lisa?", "Who stole the Mona Lisa?"),
    ("How do I undo the last git commit?", "How do I amend the last git commit?"),
    ("What is the tallest mountain in the world?", "What is the longest river in the world?"),
    ("What is the population of Tokyo?", "What is the area of Tokyo?"),
    ("How do I sort a dictionary by value in Python?", "How do I sort a dictionary by key in Python?"),
    ("What is the meaning of the word 'ubiquitous'?", "What is the meaning of the word 'ambiguous'?"),
    ("Give me a synonym for 'happy'.", "Give me an antonym for 'happy'."),
    ("What is the formula for the area of a circle?", "What is the formula for the circumference of a circle?"),
    ("Who was the first president of the United States?", "Who was the first vice president of the United States?"),
    ("What is the derivative of sin(x)?", "What is the integral of sin(x)?"),
    ("Is a tomato a fruit or a vegetable?", "Is a cucumber a fruit or a vegetable?"),
    ("What is the difference between weather and climate?", "What is the relationship between weather and climate?"),
    ("How do I read a file line by line in Python?", "How do I write a file line by line in Python?"),
    ("What year did the Titanic sink?", "What year was the Titanic built?"),
    ("How long should I boil an egg?", "How long should I boil pasta?"),
    ("Which vitamin is produced when skin is exposed to sunlight?", "Which vitamin is found in citrus fruit?"),
    ("What is the time complexity of binary search?", "What is the space complexity of binary search?"),
]

# ----------------------------------------------------------------------- building


def load_prompts(data_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    def read(name: str) -> list[dict[str, Any]]:
        with (data_dir / name).open() as f:
            return [json.loads(line) for line in f if line.strip()]

    return read("mmlu_dev.jsonl"), read("gsm8k_dev.jsonl")


def _pick(rng: random.Random, candidates: dict[str, tuple[str, str]], k: int, weight: dict[str, float]) -> list[str]:
    names = sorted(candidates)
    chosen: list[str] = []
    while names and len(chosen) < k:
        name = rng.choices(names, weights=[weight[n] for n in names])[0]
        chosen.append(name)
        names.remove(name)
    return chosen


def build_testset(
    data_dir: str | Path = DEFAULT_DATA, n_prompts: int = 400, per_prompt: int = 3, gsm8k_share: float = 0.4,
    distractors: int = 600, seed: int = 0,
) -> TestSet:  # fmt: skip
    rng = random.Random(seed)
    mmlu, gsm8k = load_prompts(Path(data_dir))
    seen: set[str] = set()

    def unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for r in rows:
            if r["prompt"] not in seen:
                seen.add(r["prompt"])
                out.append(r)
        return out

    gsm8k = unique(gsm8k)
    mmlu = unique(mmlu)
    rng.shuffle(gsm8k)
    by_subject: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in mmlu:
        by_subject[r["source"]].append(r)
    for rows in by_subject.values():
        rng.shuffle(rows)
    subjects = sorted(by_subject)
    rng.shuffle(subjects)
    n_gsm = round(n_prompts * gsm8k_share)
    picked_mmlu: list[dict[str, Any]] = []
    depth = 0
    while len(picked_mmlu) < n_prompts - n_gsm:
        for s in subjects:
            if depth < len(by_subject[s]) and len(picked_mmlu) < n_prompts - n_gsm:
                picked_mmlu.append(by_subject[s][depth])
        depth += 1
    rows = gsm8k[:n_gsm] + picked_mmlu
    originals = [Original(i, r["source"], r["prompt"]) for i, r in enumerate(rows)]
    used = {r["prompt"] for r in rows}
    rest = [r["prompt"] for r in gsm8k[n_gsm:] + mmlu if r["prompt"] not in used]
    rng.shuffle(rest)
    distractor_prompts = rest[:distractors]

    # pools for the rewrites that borrow text from elsewhere: prompts outside the test set
    option_pool = [t for p in rest[distractors : distractors + 400] if (x := split_mmlu(p)) for _, t in x[1]]
    word_pool = sorted(
        {w for p in rest[distractors : distractors + 400] for w in re.findall(r"\b[a-z]{5,}\b", p)} - STOP
    )
    question_pool = []
    for p in rest[distractors : distractors + 400]:
        part = (split_mmlu(p) or (p,))[0]
        start, end = _last_sentence_span(part)
        question = part[start:end].strip()
        if question.endswith("?") and 20 <= len(question) <= 120 and "following" not in question:
            question_pool.append(question)
    negative: dict[str, Rewrite] = dict(NEGATIVE)
    negative["extra_question"] = lambda o, r: n_extra_question(o, r, question_pool)
    negative["option_text"] = lambda o, r: n_option_text(o, r, option_pool)
    negative["content_word"] = lambda o, r: n_content_word(o, r, word_pool)

    # which rewrites apply to which original (a probe rng: applicability does not depend on the draw)
    applicable: Counter[str] = Counter()
    per_original: list[tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]] = []
    for o in originals:
        pos: dict[str, tuple[str, str]] = {}
        neg: dict[str, tuple[str, str]] = {}
        for kind, rewrites, out in (("pos", POSITIVE, pos), ("neg", negative, neg)):
            for name, rewrite in rewrites.items():
                result = rewrite(o, random.Random(f"{seed}:{o.id}:{name}"))
                if result is not None and result[0] != o.prompt:
                    out[name] = result
                    applicable[f"{kind}:{name}"] += 1
        per_original.append((pos, neg))

    variants: list[Variant] = []
    for o, (pos, neg) in zip(originals, per_original, strict=True):
        for positive, found in ((True, pos), (False, neg)):
            kind = "pos" if positive else "neg"
            weight = {n: 1.0 / applicable[f"{kind}:{n}"] for n in found}
            for name in _pick(rng, found, per_prompt, weight):
                text, detail = found[name]
                variants.append(Variant(o.id, positive, name, text, detail))
    return TestSet(originals, variants, distractor_prompts, seed, dict(sorted(applicable.items())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--per-prompt", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=0, help="examples to print per transformation")
    args = parser.parse_args()
    ts = build_testset(args.data, args.prompts, args.per_prompt, seed=args.seed)
    print(json.dumps(ts.summary(), indent=1))
    print("applicable:", json.dumps(ts.applicable))
    if args.show:
        originals = {o.id: o for o in ts.originals}
        by: dict[tuple[bool, str], list[Variant]] = defaultdict(list)
        for v in ts.variants:
            by[(v.positive, v.transform)].append(v)
        for (positive, name), vs in sorted(by.items()):
            print(f"\n=== {'POSITIVE' if positive else 'NEGATIVE'} {name} ({len(vs)})")
            for v in vs[: args.show]:
                print(f"--- [{v.detail}]\n{originals[v.original_id].prompt[:300]!r}\n{v.text[:300]!r}")


if __name__ == "__main__":
    main()
