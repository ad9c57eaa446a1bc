"""Refuse a semantic hit when two prompts differ in what makes their answers differ.

Embeddings put "what is 17 × 23?" and "what is 17 × 24?" side by side; the answers
differ all the same. Before a semantic hit is served, the two prompts must agree on
their *answer-determining tokens*, each kind a rule (the names ``refusal_reasons`` gives):

* ``code``: code blocks and inline code, exactly (whitespace collapsed);
* ``quote``: quoted strings (case, spacing, contractions and number spelling ignored);
* ``option``: the text of each lettered answer option, by letter ("A. x", "(A) x",
  "a) x" alike), so changed or swapped options are refused;
* ``num``: numbers, with "80,000" = "80000", "5.00" = "5" and "three" = "3" (zero to
  ninety-nine; "one" only where it counts something: not in "one of", "which one");
* ``numword``: other number words (hundred, half, twice, dozen, first, ...);
* ``unit``: units and currencies ("hours", "km", "GB", "$", "%" = "percent", ...);
* ``neg``: negations ("not", "n't", "never", "no", "except", ...), contractions
  written out first, so "isn't" = "is not";
* ``polar``: words whose antonym flips the answer (most/least, before/after,
  increase/decrease, true/false, ...);
* ``name``: capitalised words other than common English words (function words and
  words that often start a request). Compared by containment, case-insensitively:
  each name in one prompt must occur in the other as a word in any case, so "josh"
  matches "Josh" and "Mark" does not;
* ``lexical`` (on by default): a content word *replaced*, i.e. one prompt has a content
  word the other lacks and the other way round ("boiling point" / "freezing point").
  Adding or dropping words alone (a polite prefix, a filler sentence) passes; content
  words are compared by a crude stem ("spiders" = "spider").

All but ``name`` and ``lexical`` compare multisets. Harmless rewrites (case, spacing,
punctuation, a polite prefix or suffix, contractions, "3" for "three", "(A)" for "A.")
keep all of these; edits that change the answer usually change one. What each rule
catches and what it wrongly refuses, measured, is in ``docs/semantic-cache.md``.
The analysis of a prompt is cached (LRU), so a prompt compared with several candidates
is analysed once (about 0.1 ms for a 300-character prompt).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["answer_determinants", "guard_allows", "refusal_reasons"]

_CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)
_QUOTED = re.compile(r"\"([^\"\n]{1,200})\"|“([^”\n]{1,200})”|‘([^’\n]{1,200})’|(?<!\w)'([^'\n]{1,200})'(?!\w)")
_OPTION = re.compile(r"(?m)^[ \t]*\(?([A-Ja-j])[).:][ \t]+(.+?)[ \t]*$")
_NUMBER = re.compile(r"(?<![\w.])[-−]?(?:\d+(?:[.,/]\d+)*|\.\d+)")
_APOSTROPHE_TAIL = re.compile(r"(n[’']t|[’'](s|m|d|ll|re|ve)?)$", re.I)
_IRREGULAR_NOT = {"can't": "can", "won't": "will", "shan't": "shall", "can’t": "can", "won’t": "will", "cannot": "can"}

_UNITS_UP_TO_20 = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_CARDINAL = {w: i for i, w in enumerate(_UNITS_UP_TO_20)} | {w: 20 + 10 * i for i, w in enumerate(_TENS)}
_CARDINAL_RE = re.compile(
    r"\b(" + "|".join(_TENS) + r")[- ](" + "|".join(_UNITS_UP_TO_20[1:10]) + r")\b|\b(" + "|".join(_CARDINAL) + r")\b"
)
_ONE_NOT_A_COUNT_BEFORE = frozenset(
    ["which", "no", "any", "each", "every", "some", "the", "this", "that", "another", "someone", "anyone", "everyone"]
)
_ONE_NOT_A_COUNT_AFTER = frozenset(["of", "another", "or", "and"])
_NUMBER_WORDS = frozenset(
    [
        "hundred",
        "hundreds",
        "thousand",
        "thousands",
        "million",
        "millions",
        "billion",
        "billions",
        "trillion",
        "half",
        "halves",
        "twice",
        "thrice",
        "double",
        "triple",
        "quadruple",
        "dozen",
        "dozens",
        "quarter",
        "quarters",
        "third",
        "thirds",
        "fourth",
        "fifth",
        "sixth",
        "seventh",
        "eighth",
        "ninth",
        "tenth",
        "first",
        "second",
        "once",
    ]
)
_UNIT_WORDS = {
    **dict.fromkeys(["second", "seconds", "sec", "secs"], "second"),
    **dict.fromkeys(["minute", "minutes", "min", "mins"], "minute"),
    **dict.fromkeys(["hour", "hours", "hr", "hrs"], "hour"),
    **dict.fromkeys(["day", "days"], "day"),
    **dict.fromkeys(["week", "weeks"], "week"),
    **dict.fromkeys(["month", "months"], "month"),
    **dict.fromkeys(["year", "years"], "year"),
    **dict.fromkeys(["decade", "decades"], "decade"),
    **dict.fromkeys(["century", "centuries"], "century"),
    **dict.fromkeys(["mile", "miles"], "mile"),
    **dict.fromkeys(["yard", "yards"], "yard"),
    **dict.fromkeys(["foot", "feet", "ft"], "foot"),
    **dict.fromkeys(["inch", "inches"], "inch"),
    **dict.fromkeys(["km", "kilometer", "kilometers", "kilometre", "kilometres"], "km"),
    **dict.fromkeys(["m", "meter", "meters", "metre", "metres"], "m"),
    **dict.fromkeys(["cm", "centimeter", "centimeters", "centimetre", "centimetres"], "cm"),
    **dict.fromkeys(["mm", "millimeter", "millimeters", "millimetre", "millimetres"], "mm"),
    **dict.fromkeys(["kg", "kilogram", "kilograms", "kilo", "kilos"], "kg"),
    **dict.fromkeys(["g", "gram", "grams"], "g"),
    **dict.fromkeys(["mg", "milligram", "milligrams"], "mg"),
    **dict.fromkeys(["lb", "lbs", "pound", "pounds"], "lb"),
    **dict.fromkeys(["oz", "ounce", "ounces"], "oz"),
    **dict.fromkeys(["ton", "tons", "tonne", "tonnes"], "ton"),
    **dict.fromkeys(["l", "liter", "liters", "litre", "litres"], "l"),
    **dict.fromkeys(["ml", "milliliter", "milliliters", "millilitre", "millilitres"], "ml"),
    **dict.fromkeys(["gallon", "gallons"], "gallon"),
    **dict.fromkeys(["quart", "quarts"], "quart"),
    **dict.fromkeys(["cup", "cups"], "cup"),
    **dict.fromkeys(["pint", "pints"], "pint"),
    **dict.fromkeys(["kb", "kilobyte", "kilobytes"], "kb"),
    **dict.fromkeys(["mb", "megabyte", "megabytes"], "mb"),
    **dict.fromkeys(["gb", "gigabyte", "gigabytes"], "gb"),
    **dict.fromkeys(["tb", "terabyte", "terabytes"], "tb"),
    **dict.fromkeys(["mph", "kmh", "kph"], "speed"),
    **dict.fromkeys(["percent", "percentage"], "percent"),
    **dict.fromkeys(["dollar", "dollars", "usd"], "$"),
    **dict.fromkeys(["cent", "cents"], "cent"),
    **dict.fromkeys(["euro", "euros", "eur"], "€"),
    **dict.fromkeys(["yen", "jpy"], "¥"),
    **dict.fromkeys(["degree", "degrees"], "degree"),
    **dict.fromkeys(["radian", "radians"], "radian"),
    **dict.fromkeys(["celsius", "fahrenheit", "kelvin"], "temperature"),
    **dict.fromkeys(["watt", "watts", "kw", "kilowatt", "kilowatts"], "watt"),
    **dict.fromkeys(["volt", "volts"], "volt"),
    **dict.fromkeys(["joule", "joules"], "joule"),
    **dict.fromkeys(["acre", "acres"], "acre"),
    **dict.fromkeys(["hectare", "hectares"], "hectare"),
}
_SYMBOL_UNITS = {"$": "$", "€": "€", "£": "£", "¥": "¥", "%": "percent", "°": "degree"}
_NEGATIONS = frozenset(["not", "never", "no", "none", "nothing", "nobody", "neither", "nor", "except"])
_POLAR = frozenset(
    [
        "most",
        "least",
        "largest",
        "smallest",
        "greatest",
        "biggest",
        "fewest",
        "maximum",
        "minimum",
        "max",
        "min",
        "highest",
        "lowest",
        "increase",
        "increases",
        "increased",
        "increasing",
        "decrease",
        "decreases",
        "decreased",
        "decreasing",
        "before",
        "after",
        "true",
        "false",
        "correct",
        "incorrect",
        "right",
        "wrong",
        "best",
        "worst",
        "better",
        "worse",
        "longest",
        "shortest",
        "oldest",
        "youngest",
        "above",
        "below",
        "positive",
        "negative",
        "more",
        "less",
        "fewer",
        "higher",
        "lower",
        "larger",
        "smaller",
        "bigger",
        "greater",
        "lesser",
        "strongest",
        "weakest",
        "stronger",
        "weaker",
        "faster",
        "slower",
        "fastest",
        "slowest",
        "accurate",
        "inaccurate",
        "likely",
        "unlikely",
        "always",
        "early",
        "late",
        "earlier",
        "later",
        "earliest",
        "latest",
        "inside",
        "outside",
        "last",
        "same",
        "different",
        "similar",
        "upper",
    ]
)
_CONTRACTION = re.compile(r"\b([a-z]+)[’']([a-z]+)\b")
_NOT_STEMS = {"can": "can", "won": "will", "shan": "shall", "ain": "is"}
_IS_HEADS = frozenset(["it", "that", "what", "there", "here", "who", "where", "how", "he", "she"])
_TAILS = {"re": " are", "ve": " have", "ll": " will", "m": " am"}


def _expand_one(m: re.Match[str]) -> str:
    head, tail = m.groups()
    if tail == "t" and head.endswith("n"):
        return _NOT_STEMS.get(head, head[:-1]) + " not"
    if tail == "s" and head in _IS_HEADS:
        return head + " is"
    if tail in _TAILS:
        return head + _TAILS[tail]
    return m.group(0)


def _expand(text: str) -> str:
    """Contractions written out (lower-case text): "don't" -> "do not", "what's" -> "what is"."""
    if "cannot" in text:
        text = text.replace("cannot", "can not")
    if "'" not in text and "’" not in text:
        return text
    return _CONTRACTION.sub(_expand_one, text)


# Words that carry no topic of their own: a rewrite may add, drop or swap them freely.
_FUNCTION_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "this",
        "that",
        "these",
        "those",
        "there",
        "here",
        "it",
        "its",
        "i",
        "me",
        "my",
        "mine",
        "we",
        "us",
        "our",
        "you",
        "your",
        "he",
        "him",
        "his",
        "she",
        "her",
        "they",
        "them",
        "their",
        "what",
        "which",
        "who",
        "whom",
        "whose",
        "why",
        "how",
        "when",
        "where",
        "whether",
        "if",
        "then",
        "than",
        "so",
        "thus",
        "hence",
        "therefore",
        "because",
        "since",
        "as",
        "while",
        "although",
        "though",
        "however",
        "but",
        "and",
        "or",
        "nor",
        "not",
        "no",
        "yes",
        "yet",
        "also",
        "too",
        "either",
        "neither",
        "both",
        "all",
        "any",
        "some",
        "each",
        "every",
        "many",
        "much",
        "most",
        "more",
        "few",
        "several",
        "such",
        "other",
        "another",
        "same",
        "own",
        "only",
        "just",
        "even",
        "still",
        "already",
        "again",
        "always",
        "never",
        "often",
        "sometimes",
        "usually",
        "now",
        "in",
        "on",
        "at",
        "of",
        "for",
        "to",
        "from",
        "by",
        "with",
        "without",
        "within",
        "into",
        "onto",
        "upon",
        "about",
        "above",
        "below",
        "over",
        "under",
        "between",
        "among",
        "through",
        "during",
        "before",
        "after",
        "until",
        "against",
        "across",
        "along",
        "around",
        "behind",
        "beyond",
        "near",
        "off",
        "out",
        "up",
        "down",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "am",
        "do",
        "does",
        "did",
        "done",
        "doing",
        "have",
        "has",
        "had",
        "having",
        "can",
        "could",
        "shall",
        "should",
        "will",
        "would",
        "may",
        "might",
        "must",
        "let",
        "please",
        "thanks",
        "thank",
        "hi",
        "hello",
        "hey",
        "ok",
        "okay",
        "sure",
        "well",
        "oh",
        "very",
        "really",
        "quite",
        "rather",
        "way",
        "ways",
        "thing",
        "things",
        "one",
        "ones",
        "get",
        "gets",
        "got",
    ]
)
# Capitalised words that are not names: function words, and words that often start a request.
_COMMON = _FUNCTION_WORDS | frozenset(
    [
        "dear",
        "today",
        "tomorrow",
        "yesterday",
        "soon",
        "question",
        "questions",
        "answer",
        "answers",
        "q",
        "options",
        "option",
        "choose",
        "select",
        "pick",
        "true",
        "false",
        "note",
        "remember",
        "consider",
        "suppose",
        "assume",
        "given",
        "imagine",
        "find",
        "compute",
        "calculate",
        "determine",
        "evaluate",
        "estimate",
        "solve",
        "explain",
        "describe",
        "list",
        "name",
        "identify",
        "give",
        "tell",
        "show",
        "write",
        "state",
        "define",
        "compare",
        "discuss",
        "summarize",
        "check",
        "help",
        "need",
        "want",
        "like",
        "know",
        "think",
        "say",
        "see",
        "look",
        "use",
        "make",
        "take",
        "try",
        "read",
        "quick",
        "quickly",
        "statement",
        "scenario",
        "choice",
        "correct",
        "incorrect",
        "best",
        "following",
        "based",
        "according",
        "regarding",
        "concerning",
        "two",
        "three",
        "first",
        "second",
        "third",
        "next",
        "last",
        "finally",
    ]
)

_LETTERS = re.compile(r"[a-z]+")
_CAPITALISED = re.compile(r"(?<![\w’'-])[A-Z][A-Za-z’'-]*")
_LAST_WORD = re.compile(r"([a-z]+)\W*$")
_FIRST_WORD = re.compile(r"\W*([a-z]+)")
_NOT_CONTENT = _FUNCTION_WORDS | frozenset(_CARDINAL) | _NUMBER_WORDS | frozenset(_UNIT_WORDS) | _NEGATIONS


def _normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).replace("−", "-")


def _canon(text: str) -> str:
    """Text compared as a whole (options, quotes): case, spacing, contractions and number spelling ignored."""
    text = _expand(text.lower())
    text = _CARDINAL_RE.sub(lambda m: str(_cardinal(m)), text)
    return " ".join(text.split()).strip(" .;,")


def _cardinal(m: re.Match[str]) -> int:
    if m.group(3) is not None:
        return _CARDINAL[m.group(3)]
    return _CARDINAL[m.group(1)] + _CARDINAL[m.group(2)]


def _number_key(raw: str) -> str:
    n = raw.replace("−", "-")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", n):
        n = n.replace(",", "")
    if re.fullmatch(r"-?\d*\.\d+", n):
        n = n.rstrip("0").rstrip(".") or "0"
        if n.startswith("."):
            n = "0" + n
    return n


@lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    """A crude stem, so that "spiders"/"spider" and "boils"/"boiled"/"boiling" compare equal."""
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        word = word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)]
    return word


@dataclass(frozen=True, slots=True)
class _Analysis:
    determinants: Counter[str]
    """Everything but names and content words: compared as multisets."""
    names: frozenset[str]
    words: frozenset[str]
    """Every word, lower case: where the other prompt's names are looked up."""
    content: Counter[str]
    """Stems of the content words (not function, number or unit words), counted: the lexical rule."""


@lru_cache(maxsize=4096)
def _analyse(prompt: str) -> _Analysis:
    text = _normalise(prompt)
    found: Counter[str] = Counter()
    if "`" in text:
        for block in _CODE.findall(text):
            found["code:" + " ".join(block.strip("`").split())] += 1
        text = _CODE.sub(" ", text)
    for match in _QUOTED.finditer(text):
        quoted = next(g for g in match.groups() if g is not None)
        found["quote:" + _canon(quoted)] += 1
    for letter, option in _OPTION.findall(text):
        found[f"option:{letter.upper()}:" + _canon(option)] += 1
    for number in _NUMBER.findall(text):
        found["num:" + _number_key(number)] += 1
    for symbol, unit in _SYMBOL_UNITS.items():
        if symbol in text:
            found["unit:" + unit] += text.count(symbol)
    lower = _expand(text.lower())
    for m in _CARDINAL_RE.finditer(lower):
        if m.group(3) == "one" and _one_is_not_a_count(lower, m):
            continue
        found[f"num:{_cardinal(m)}"] += 1
    words = _LETTERS.findall(lower)
    content: Counter[str] = Counter()
    for w in words:
        if w in _NOT_CONTENT:
            if w in _NUMBER_WORDS:
                found["numword:" + w] += 1
            if w in _UNIT_WORDS:
                found["unit:" + _UNIT_WORDS[w]] += 1
            if w in _NEGATIONS:
                found["neg:" + w] += 1
        elif len(w) >= 3:
            content[_stem(w)] += 1
        if w in _POLAR:
            found["polar:" + w] += 1
    names: set[str] = set()
    for match in _CAPITALISED.finditer(text):
        raw = match.group(0).lower()
        word = _IRREGULAR_NOT.get(raw) or (_APOSTROPHE_TAIL.sub("", raw) if "'" in raw or "’" in raw else raw)
        if word not in _COMMON:
            names.update(_LETTERS.findall(word))
    return _Analysis(found, frozenset(names), frozenset(words), content)


def _one_is_not_a_count(lower: str, m: re.Match[str]) -> bool:
    """ "one" in "which one", "one of", "no one": not a number."""
    before = _LAST_WORD.search(lower, max(0, m.start() - 24), m.start())
    after = _FIRST_WORD.match(lower, m.end())
    return bool(before and before.group(1) in _ONE_NOT_A_COUNT_BEFORE) or bool(
        after and after.group(1) in _ONE_NOT_A_COUNT_AFTER
    )


def answer_determinants(prompt: str) -> Counter[str]:
    """The multiset of tokens that, if changed, change the answer (names as ``name:<lower case>``)."""
    a = _analyse(prompt)
    return a.determinants + Counter("name:" + n for n in a.names)


def guard_allows(new_prompt: str, cached_prompt: str, *, lexical: bool = True, beyond_window: bool = False) -> bool:
    """Whether a cached answer to ``cached_prompt`` may be served for ``new_prompt``.

    ``lexical``: also refuse when a content word was *replaced* (one dropped and another
    added, as in "boiling point" -> "freezing point"); adding or dropping words alone
    (a polite prefix, a filler sentence) is allowed.
    ``beyond_window``: one of the prompts ran past the embedding's token window, so the
    similarity did not see all of it (a question appended after the window embeds exactly
    like the prompt without it): then the content words must be the same, none added or
    dropped (rule ``unseen``).
    """
    if new_prompt == cached_prompt:
        return True
    return not refusal_reasons(new_prompt, cached_prompt, lexical=lexical, beyond_window=beyond_window)


def refusal_reasons(
    new_prompt: str, cached_prompt: str, *, lexical: bool = True, beyond_window: bool = False
) -> list[str]:
    """The rules that refuse the pair (``num``, ``name``, ``lexical``, ...); empty when the guard allows it."""
    new, old = _analyse(new_prompt), _analyse(cached_prompt)
    kinds = {
        key.split(":", 1)[0] for key in (new.determinants - old.determinants) + (old.determinants - new.determinants)
    }
    if not (new.names <= old.words and old.names <= new.words):
        kinds.add("name")
    if lexical and new.content - old.content and old.content - new.content:
        kinds.add("lexical")
    if beyond_window and new.content != old.content:
        kinds.add("unseen")
    return sorted(kinds)
