"""Strict reading of the teacher's replies. A reply becomes question / answer turns, or is
rejected with a reason: cut off, malformed, leaking its sources (captions, boxes,
coordinates), contradicting the boxes' counts, apologising instead of answering, caught in
a repetition loop, or answering a count or yes/no question with something else."""

from __future__ import annotations

import re
from collections import Counter

NUMBERS = {"no": 0, "zero": 0, "one": 1, "a single": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
           "seven": 7, "eight": 8, "nine": 9, "ten": 10, "a pair of": 2}
SOURCE_WORDS = re.compile(
    r"\b(captions?|bounding box(es)?|bbox(es)?|coordinates?|annotations?|the (given |provided )?descriptions?"
    r"|the (given |provided )?list)\b|\[\s*\d", re.IGNORECASE)
DECIMAL = re.compile(r"(?<![\w.])0?\.\d+\b")  # fractions below 1 look like the boxes' coordinates
REFUSAL = re.compile(r"\b(sorry|apologi[sz]e|i cannot|i can't|i can not|as an ai|i am unable|i'm unable|"
                     r"language model)\b", re.IGNORECASE)
QA_LINE = re.compile(r"^\s*(Q|A)\s*[:.]\s*(.*)$", re.IGNORECASE)
# A sentence, or a run of LOOP_WORDS words, said LOOP_REPEATS times is a decoding loop: prose
# may say a thing twice, but a third identical eight-word run does not happen in a paragraph.
LOOP_REPEATS, LOOP_WORDS = 3, 8
COUNT_QUESTION = re.compile(r"\b(how many|the number of)\b", re.IGNORECASE)
COUNT_ANSWER = re.compile(
    r"\d|\b(no|none|zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|"
    r"fifteen|sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|hundred|dozens?|single|pair|couple|"
    r"both)\b", re.IGNORECASE)
# "Is / are / does ... ?" asks for a yes or a no; "Is it red or blue?" asks to choose, and a
# modal ("Can you describe ...?") is often a request, so neither is held to this.
YES_NO_QUESTION = re.compile(r"^\s*(is|are|was|were|am|do|does|did|has|have|had)(n't)?\b(?!.*\bor\b)",
                             re.IGNORECASE)
YES_NO_ANSWER = re.compile(r"^\W*(yes|yeah|yep|no|nope|not|none|nothing|never|certainly|indeed|absolutely|"
                           r"definitely|of course|correct|sure)\b", re.IGNORECASE)


class Rejected(ValueError):
    """A reply that cannot become training data; `reason` is a short label for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def parse_pairs(text: str, min_pairs: int, max_pairs: int) -> list[tuple[str, str]]:
    """`Q:` / `A:` lines, strictly alternating; an answer may run over several lines."""
    pairs: list[list[str]] = []
    expect = "q"
    for line in text.strip().splitlines():
        if not line.strip():
            continue
        m = QA_LINE.match(line)
        if m is None:
            if expect == "q" and pairs:  # continuation of the previous answer
                pairs[-1][1] += " " + line.strip()
                continue
            raise Rejected("malformed", f"unexpected line {line.strip()[:60]!r}")
        kind, body = m.group(1).lower(), m.group(2).strip()
        if kind != expect:
            raise Rejected("malformed", f"'{kind.upper()}:' where '{expect.upper()}:' was due")
        if not body:
            raise Rejected("malformed", f"empty '{kind.upper()}:' line")
        if kind == "q":
            pairs.append([body, ""])
        else:
            pairs[-1][1] = body
        expect = "a" if kind == "q" else "q"
    if expect == "a":
        raise Rejected("malformed", "a question without an answer")
    if not min_pairs <= len(pairs) <= max_pairs:
        raise Rejected("malformed", f"{len(pairs)} question(s), expected {min_pairs} to {max_pairs}")
    return [(q, a) for q, a in pairs]


def check_text(text: str, counts: Counter, known: set[str]) -> None:
    """Reject text that names its sources or states a count the boxes contradict."""
    m = SOURCE_WORDS.search(text) or DECIMAL.search(text)
    if m:
        raise Rejected("mentions its sources", repr(m.group(0)))
    if REFUSAL.search(text):
        raise Rejected("apology or refusal", repr(REFUSAL.search(text).group(0)))
    for category in known:
        for said, qualified, phrase in _stated_counts(text, category):
            _compare(said, qualified, phrase, category, counts)


def _number(word: str) -> int | None:
    return int(word) if word.isdigit() else NUMBERS.get(word.lower())


def _category_names(category: str) -> str:
    """A regex alternation of the category and its plural."""
    plural = category + ("es" if category.endswith(("s", "x", "ch", "sh")) else "s")
    return f"{re.escape(plural)}|{re.escape(category)}"


def _stated_counts(text: str, category: str):
    """(number, qualified by other words, phrase) for each 'N [word [word]] category' in text."""
    words = "|".join(re.escape(w) for w in sorted(NUMBERS, key=len, reverse=True))
    pattern = rf"\b({words}|\d+)\s+((?:[a-z-]+\s+){{0,2}}?)({_category_names(category)})\b"
    for m in re.finditer(pattern, text, re.IGNORECASE):
        said = _number(m.group(1))
        if said is not None:
            yield said, bool(m.group(2).strip()), m.group(0)


def _compare(said: int, qualified: bool, phrase: str, category: str, counts: Counter) -> None:
    # "two circles" must match the boxes; "two blue circles" can only be fewer or as many
    have = counts.get(category, 0)
    if said > have or (not qualified and said != have):
        raise Rejected("count contradicts the boxes", f"says {phrase!r}, boxes have {have} {category}")


def check_pair(question: str, answer: str, counts: Counter, known: set[str]) -> None:
    """A 'How many ...?' question answered with a number is held to the boxes as well."""
    m = re.match(r"\s*how many\s+(.*)\?", question, re.IGNORECASE)
    first = re.match(r"\s*(\w+)", answer)
    if not m or not first or _number(first.group(1)) is None:
        return
    for category in known:
        found = re.search(rf"((?:[a-z-]+\s+){{0,2}}?)\b({_category_names(category)})\b", m.group(1), re.IGNORECASE)
        if found:
            _compare(_number(first.group(1)), bool(found.group(1).strip()), f"{question} {answer}", category,
                     counts)


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def check_repetition(text: str) -> None:
    """Reject a repetition loop: one sentence, or one run of `LOOP_WORDS` words, said
    `LOOP_REPEATS` times or more."""
    sentences = Counter(" ".join(_words(s)) for s in re.split(r"(?<=[.!?])\s+", text) if _words(s))
    words = _words(text)
    runs = Counter(" ".join(words[k:k + LOOP_WORDS]) for k in range(len(words) - LOOP_WORDS + 1))
    for said, n in sentences.most_common(1) + runs.most_common(1):  # apart: a sentence may be a run too
        if n >= LOOP_REPEATS:
            raise Rejected("repetition", f"{said[:60]!r} {n} times")


def check_answer_type(question: str, answer: str) -> None:
    """A count question needs a number in its answer (digits or a number word, "no" and
    "none" included); a yes/no question needs an answer that starts with yes, no or a clear
    equivalent ("Not really", "Certainly")."""
    if COUNT_QUESTION.search(question) and not COUNT_ANSWER.search(answer):
        raise Rejected("answer type", f"no number in the answer to {question[:60]!r}: {answer[:60]!r}")
    if YES_NO_QUESTION.match(question) and not COUNT_QUESTION.search(question) and not YES_NO_ANSWER.match(answer):
        raise Rejected("answer type", f"no yes or no answering {question[:60]!r}: {answer[:60]!r}")


def _norm_question(q: str) -> tuple[str, ...]:
    return tuple(re.sub(r"[^a-z0-9 ]", " ", q.lower()).split())


def drop_repeated_questions(pairs: list[tuple[str, str]], seen: list[tuple[str, ...]] | None = None,
                            threshold: float = 0.8) -> tuple[list[tuple[str, str]], int]:
    """Pairs whose question is not an exact or near duplicate (word-set Jaccard at or above
    `threshold`) of an earlier one here or in `seen` (which the kept questions join);
    returns them and how many went."""
    seen = seen if seen is not None else []
    kept, dropped = [], 0
    for q, a in pairs:
        words = _norm_question(q)
        if any(words == s or (set(words) and len(set(words) & set(s)) / len(set(words) | set(s)) >= threshold)
               for s in seen):
            dropped += 1
            continue
        seen.append(words)
        kept.append((q, a))
    return kept, dropped


def read_reply(task: str, text: str, finish_reason: str, counts: Counter, known: set[str]) -> list[tuple[str, str]]:
    """The reply as (question, answer) pairs for `conversation` and `complex_reasoning`, or
    as `[("", paragraph)]` for `detail` and `refine`; raises `Rejected`."""
    if finish_reason == "length":
        raise Rejected("cut off", "the reply reached the token limit")
    text = text.strip()
    if not text:
        raise Rejected("empty")
    check_text(text, counts, known)
    if task == "conversation":
        pairs = parse_pairs(text, 1, 8)
    elif task == "complex_reasoning":
        pairs = parse_pairs(text, 1, 1)
    else:
        if QA_LINE.match(text.splitlines()[0]):
            raise Rejected("malformed", "a question and answer where a paragraph was due")
        if len(text.split()) < 8:
            raise Rejected("too short", f"{len(text.split())} words")
        check_repetition(text)
        if text[-1] not in ".!?\"')":
            raise Rejected("cut off", "the paragraph ends mid-sentence")
        return [("", " ".join(text.split()))]
    for q, a in pairs:
        check_pair(q, a, counts, known)
        if not q.endswith("?"):
            raise Rejected("malformed", f"question without a question mark: {q[:60]!r}")
        if len(a.split()) < 1:
            raise Rejected("malformed", "empty answer")
        check_repetition(a)
        check_answer_type(q, a)
    return pairs
