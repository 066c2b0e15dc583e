"""Synthetic multiple-choice task domains for the routing-gap benchmark.

Each domain draws a random instance (numbers, letters, facts, keywords), renders it through a
*surface form* and builds the choices (gold + distractors). A surface form is a prefix (shared
by all domains, often empty), a *frame* (the domain's phrasing of the request) and an answer
cue (shared: ``Answer:``, ``=``, ``A:``, ``->``). The frames of every domain are partitioned
four ways, and each split only ever sees its own:

- ``pretrain``: the frames the benchmark model is pretrained on (``pretrain.py``);
- ``adapt``: frames never seen in pretraining, present in the training pool only, so the base
  model fails on part of the pool and the success set S is a real subset;
- ``val``: held-out frames for the hyper-parameter search;
- ``test``: held-out frames for the reported numbers; never used for training, neighbour search
  or tuning. The test split also uses one distractor style per domain no other split uses.

A fifth group, ``read``, is in no split: frames that reuse the held-out frames' wrappers
("Kindly ...", "Work out ... for me", "What do you get ...") in other combinations, for the
variant model that is pretrained to *read* them while its router is never taught where to send
them (``pretrain.PretrainConfig.read_share``; ``docs/quality.md``, "A model that reads the
wrappers"). The bundled model is pretrained without them.

Domains come in groups that share an input format (letter strings: reverse / length; number
lists: sorting / pattern / compare), so the frame, not the input, says which skill to apply;
a held-out frame keeps a domain keyword ("reverse", "sort", "largest") in unfamiliar wording,
which is where a base router that keys on surface tokens can send the token to the wrong
experts. The words of every frame also occur in pretraining, but only in ``background``
sentences (random word sequences, no task), the way a real LM knows words it has never seen in
a given instruction format.

Samples are in the trainer's JSONL format ``{"task", "prompt", "choices", "answer"}``. The trainer
scores a choice as ``tokens(prompt) + tokens(choice)`` (tokenized apart, no separator:
``roma_trainer.scoring``), so pretraining feeds exactly those token sequences (``pretrain.py``).
Everything is deterministic from ``seed`` (string seeds hash with SHA-512 in ``random.Random``).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from roma_bench.samples import write_jsonl

TemplateGroup = Literal["pretrain", "adapt", "val", "test", "read"]
Split = Literal["train", "val", "test"]
# Which frame groups feed each split.
SPLIT_GROUPS: dict[Split, tuple[TemplateGroup, ...]] = {
    "train": ("pretrain", "adapt"),
    "val": ("val",),
    "test": ("test",),
}
PREFIXES = ("", "", "", "Q:", "Task:", "Now,", "Next,")
CUES = ("Answer:", "=", "A:", "->")
BACKGROUND_SHARE = 0.1  # of the pretraining stream


@dataclass(frozen=True)
class Instance:
    """One drawn problem: frame fields, the gold answer and candidate distractors by style."""

    fields: dict[str, str]
    answer: str
    distractors: dict[str, list[str]]


@dataclass(frozen=True)
class Task:
    name: str
    frames: dict[TemplateGroup, tuple[str, ...]]
    draw: Callable[[random.Random], Instance]
    n_choices: int
    # The last style is held out: only the test split uses it.
    styles: tuple[str, ...]


def _unique(options: list[str], answer: str, n: int, rng: random.Random) -> list[str]:
    """Distinct distractors, different from the answer, at most ``n``."""
    out: list[str] = []
    for opt in options:
        if opt != answer and opt not in out:
            out.append(opt)
    rng.shuffle(out)
    return out[:n]


def _nums(xs: list[int]) -> list[str]:
    return [str(x) for x in xs if x >= 0]


# --- arithmetic -------------------------------------------------------------------------------


def _arithmetic(rng: random.Random) -> Instance:
    a, b = rng.randint(1, 19), rng.randint(1, 19)
    s = a + b
    return Instance(
        {"a": str(a), "b": str(b)},
        str(s),
        {
            "near": _nums([s - 2, s - 1, s + 1, s + 2]),
            "tens": _nums([s + 10, s - 10, s + 1, s - 1]),
            "operand": _nums([a, b, a + b + 3, abs(a - b)]),
        },
    )


ARITHMETIC = Task(
    "arithmetic",
    {
        "pretrain": (
            "Add {a} and {b}.",
            "What is {a} plus {b}?",
            "{a} + {b}",
            "Sum of {a} and {b}.",
            "Compute {a} plus {b}.",
            "{a} plus {b}",
        ),
        "adapt": ("Please add {b} to {a}.", "Find the sum of {a} and {b}."),
        "read": (
            "Kindly work out the sum of {a} and {b}.",
            "Tell me what {a} plus {b} is.",
            "What do you get for {a} plus {b}?",
            "Show the sum of {a} and {b} for me.",
        ),
        "val": ("How much is {a} plus {b}?", "Tell me the sum of {a} and {b}."),
        "test": (
            "Kindly add the numbers {a} and {b} together.",
            "Work out {a} plus {b} for me.",
            "What do you get when you add {a} and {b}?",
        ),
    },
    _arithmetic,
    n_choices=4,
    styles=("near", "tens", "operand"),
)

# --- string manipulation: reverse a letter sequence ------------------------------------------

_LETTERS = "abcdefghijklmnop"


def _reverse(rng: random.Random) -> Instance:
    letters = rng.sample(_LETTERS, rng.randint(3, 4))
    rev = letters[::-1]
    sp = " ".join
    rotated = letters[1:] + letters[:1]
    swapped = [rev[1], rev[0], *rev[2:]]
    return Instance(
        {"s": sp(letters)},
        sp(rev),
        {
            "copy": [sp(letters), sp(rotated), sp(swapped)],
            "swap": [sp(swapped), sp(rev[1:] + rev[:1]), sp(letters)],
            "shuffle": [sp(rng.sample(letters, len(letters))) for _ in range(4)],
        },
    )


REVERSE = Task(
    "reverse",
    {
        "pretrain": (
            "Reverse the letters {s}.",
            "Write {s} backwards.",
            "reverse({s})",
            "Reverse {s}.",
            "The letters {s} in reverse.",
            "{s} backwards",
        ),
        "adapt": ("Please reverse the sequence {s}.", "Give {s} written backwards."),
        "read": (
            "Kindly write {s} backwards.",
            "Tell me {s} in reverse.",
            "What do you get if you reverse {s}?",
            "Work out the reverse of {s} for me.",
        ),
        "val": ("How does {s} read backwards?", "Show the reverse of {s}."),
        "test": (
            "Kindly reverse the letters {s} for me.",
            "Spell {s} in reverse order.",
            "What do you get when you write {s} backwards?",
        ),
    },
    _reverse,
    n_choices=4,
    styles=("copy", "swap", "shuffle"),
)

# --- counting: length of a letter sequence ----------------------------------------------------


def _length(rng: random.Random) -> Instance:
    n = rng.randint(2, 7)
    letters = [rng.choice(_LETTERS) for _ in range(n)]
    return Instance(
        {"s": " ".join(letters)},
        str(n),
        {
            "near": _nums([n - 1, n + 1, n + 2, n - 2]),
            "far": _nums([n + 3, n + 2, n - 2, n - 3, n + 4]),
            "letters": _nums([n * 2, n + 1, n - 1, len(set(letters))]),
        },
    )


LENGTH = Task(
    "length",
    {
        "pretrain": (
            "How many letters in {s}?",
            "Count the letters {s}.",
            "len({s})",
            "Length of {s}.",
            "Number of letters in {s}.",
            "{s} has how many letters?",
        ),
        "adapt": ("Please count the letters in {s}.", "Find the length of {s}."),
        "read": (
            "Kindly count the letters of {s}.",
            "Tell me the length of {s}.",
            "What do you get for the length of {s}?",
            "Work out how many letters {s} has.",
        ),
        "val": ("How long is the sequence {s}?", "Tell me how many letters {s} has."),
        "test": (
            "Kindly count how many letters are in {s}.",
            "Work out the length of {s} for me.",
            "What do you get when you count the letters {s}?",
        ),
    },
    _length,
    n_choices=4,
    styles=("near", "far", "letters"),
)

# --- sorting ----------------------------------------------------------------------------------


def _sorting(rng: random.Random) -> Instance:
    xs = rng.sample(range(10), 4)
    gold = sorted(xs)
    sp = lambda v: " ".join(map(str, v))  # noqa: E731
    adjacent = [[*gold[:i], gold[i + 1], gold[i], *gold[i + 2 :]] for i in range(3)]
    return Instance(
        {"xs": sp(xs)},
        sp(gold),
        {
            "desc": [sp(sorted(xs, reverse=True)), sp(xs), sp(adjacent[0])],
            "swap": [sp(a) for a in adjacent],
            "shuffle": [sp(rng.sample(xs, 4)) for _ in range(5)],
        },
    )


SORTING = Task(
    "sorting",
    {
        "pretrain": (
            "Sort ascending: {xs}.",
            "Put {xs} in increasing order.",
            "sorted({xs})",
            "Sort {xs}.",
            "Order {xs} from small to large.",
            "{xs} sorted",
        ),
        "adapt": ("Please sort the digits {xs}.", "Arrange {xs} in increasing order."),
        "read": (
            "Kindly put {xs} in increasing order.",
            "Tell me {xs} sorted.",
            "What do you get if you order {xs}?",
            "Work out {xs} in order for me.",
        ),
        "val": ("How do {xs} look when sorted?", "Show {xs} in order from small to large."),
        "test": (
            "Kindly sort the numbers {xs} for me.",
            "Line up {xs} in increasing order.",
            "What do you get when you sort {xs}?",
        ),
    },
    _sorting,
    n_choices=4,
    styles=("desc", "swap", "shuffle"),
)

# --- pattern completion -----------------------------------------------------------------------


def _pattern(rng: random.Random) -> Instance:
    start, step = rng.randint(0, 20), rng.randint(1, 4)
    seq = [start + i * step for i in range(4)]
    nxt = seq[-1] + step
    return Instance(
        {"seq": " ".join(map(str, seq))},
        str(nxt),
        {
            "off": _nums([nxt - 1, nxt + 1, nxt + 2]),
            "repeat": _nums([seq[-1], nxt + step, nxt - 1]),
            "double": _nums([seq[-1] * 2, nxt + 1, seq[-1]]),
        },
    )


PATTERN = Task(
    "pattern",
    {
        "pretrain": (
            "Continue the sequence {seq}.",
            "What comes after {seq}?",
            "next({seq})",
            "Next number: {seq}.",
            "The sequence {seq} continues with",
            "{seq} then",
        ),
        "adapt": ("Please continue {seq}.", "Find the next number after {seq}."),
        "read": (
            "Kindly give the next number after {seq}.",
            "Tell me what comes after {seq}.",
            "What do you get after {seq}?",
            "Work out the next number in {seq} for me.",
        ),
        "val": ("How does the sequence {seq} go on?", "Show what comes next in {seq}."),
        "test": (
            "Kindly continue the numbers {seq} for me.",
            "Work out what comes after {seq}.",
            "What do you get next in the sequence {seq}?",
        ),
    },
    _pattern,
    n_choices=4,
    styles=("off", "repeat", "double"),
)

# --- comparison -------------------------------------------------------------------------------


def _compare(rng: random.Random) -> Instance:
    xs = rng.sample(range(10, 100), 3)
    gold = max(xs)
    rest = [str(x) for x in xs if x != gold]
    return Instance(
        {"xs": ", ".join(map(str, xs))},
        str(gold),
        {"given": rest, "given2": rest, "min": [str(min(xs)), *rest]},
    )


COMPARE = Task(
    "compare",
    {
        "pretrain": (
            "Which is largest: {xs}?",
            "The biggest of {xs}.",
            "max({xs})",
            "Largest of {xs}.",
            "Pick the largest: {xs}.",
            "{xs} largest",
        ),
        "adapt": ("Please find the largest of {xs}.", "Give the biggest number in {xs}."),
        "read": (
            "Kindly give the biggest of {xs}.",
            "Tell me the largest of {xs}.",
            "What do you get for the max of {xs}?",
            "Work out the largest value in {xs}.",
        ),
        "val": ("Which number is the biggest: {xs}?", "Show the largest value in {xs}."),
        "test": (
            "Kindly pick the largest number from {xs}.",
            "Work out the biggest of {xs} for me.",
            "What do you get when you take the largest of {xs}?",
        ),
    },
    _compare,
    n_choices=3,
    styles=("given", "given2", "min"),
)

# --- recall of facts stated in the prompt -----------------------------------------------------

_NAMES = ["Tom", "Ann", "Bob", "Mia", "Sam", "Eva", "Max", "Zoe", "Leo", "Ida"]
_OBJECTS = ["key", "lamp", "cup", "book", "ring", "coat", "map", "drum", "pen", "hat"]


def _recall(rng: random.Random) -> Instance:
    names = rng.sample(_NAMES, 4)
    objects = rng.sample(_OBJECTS, 2)
    facts = " ".join(f"{n} has the {o}." for n, o in zip(names, objects, strict=False))
    i = rng.randrange(2)
    return Instance(
        {"facts": facts, "obj": objects[i]},
        names[i],
        {
            "mentioned": [names[1 - i], names[2]],
            "absent": [names[2], names[3]],
            "both": [names[1 - i], names[3]],
        },
    )


RECALL = Task(
    "recall",
    {
        "pretrain": (
            "{facts} Who has the {obj}?",
            "{facts} The {obj} belongs to",
            "{facts} Owner of the {obj}.",
            "{facts} Who owns the {obj}?",
            "{facts} Who holds the {obj}?",
            "{facts} {obj} owner",
        ),
        "adapt": ("{facts} Please name who has the {obj}.", "{facts} Find the owner of the {obj}."),
        "read": (
            "{facts} Kindly tell me who holds the {obj}.",
            "{facts} Tell me the owner of the {obj}.",
            "{facts} What do you get for the owner of the {obj}?",
            "{facts} Work out who holds the {obj} for me.",
        ),
        "val": ("{facts} Which person has the {obj}?", "{facts} Tell me who owns the {obj}."),
        "test": (
            "{facts} Kindly say who has the {obj}.",
            "{facts} Work out the owner of the {obj} for me.",
            "{facts} Who do you get when you ask for the {obj}?",
        ),
    },
    _recall,
    n_choices=3,
    styles=("mentioned", "absent", "both"),
)

# --- keyword classification -------------------------------------------------------------------

_TOPICS = {
    "sports": ["goal", "team", "match", "ball", "coach", "race"],
    "food": ["bread", "soup", "apple", "cake", "rice", "salad"],
    "weather": ["rain", "snow", "wind", "storm", "cloud", "sun"],
    "music": ["song", "drum", "guitar", "choir", "piano", "tune"],
}
_FILLER = ["the", "a", "we", "saw", "today", "new", "big", "old", "my", "then", "at", "home"]


def _classify(rng: random.Random) -> Instance:
    topic = rng.choice(list(_TOPICS))
    words = rng.sample(_FILLER, rng.randint(3, 5))
    words.insert(rng.randrange(len(words) + 1), rng.choice(_TOPICS[topic]))
    others = [t for t in _TOPICS if t != topic]
    return Instance(
        {"text": " ".join(words)},
        topic,
        {"labels": others, "labels2": others, "labels3": others},
    )


CLASSIFY = Task(
    "classify",
    {
        "pretrain": (
            "Topic of: {text}.",
            "Classify the sentence '{text}'.",
            "category({text})",
            "The topic of '{text}' is",
            "What is '{text}' about?",
            "{text} topic",
        ),
        "adapt": ("Please classify '{text}'.", "Find the topic of '{text}'."),
        "read": (
            "Kindly give the topic of '{text}'.",
            "Tell me what '{text}' is about.",
            "What do you get for the topic of '{text}'?",
            "Work out the topic of '{text}' for me.",
        ),
        "val": ("Which topic fits '{text}'?", "Tell me the topic of '{text}'."),
        "test": (
            "Kindly classify the sentence '{text}' for me.",
            "Work out what '{text}' is about.",
            "What do you get when you classify '{text}'?",
        ),
    },
    _classify,
    n_choices=4,
    styles=("labels", "labels2", "labels3"),
)

TASKS: dict[str, Task] = {
    t.name: t for t in (ARITHMETIC, REVERSE, LENGTH, SORTING, PATTERN, COMPARE, RECALL, CLASSIFY)
}


def _rng(seed: int, *parts: str) -> random.Random:
    return random.Random("/".join([str(seed), *parts]))


def render(frame: str, fields: dict[str, str], rng: random.Random) -> str:
    """Prefix + frame + cue: the prefix and the cue are drawn from the shared sets."""
    prefix = rng.choice(PREFIXES)
    text = frame.format(**fields)
    return f"{prefix} {text} {rng.choice(CUES)}" if prefix else f"{text} {rng.choice(CUES)}"


def make_sample(task: Task, rng: random.Random, frame: str, styles: tuple[str, ...]) -> dict:
    """Render one sample: the gold answer at a random position among the choices."""
    inst = task.draw(rng)
    style = rng.choice(styles)
    need = task.n_choices - 1
    distractors = _unique(inst.distractors[style], inst.answer, need, rng)
    if len(distractors) < need:  # a style can yield too few distinct values: top up (from
        # this split's styles only: the held-out one must not leak into training)
        others = [d for s in styles for d in inst.distractors[s] if d not in distractors]
        distractors += _unique(others, inst.answer, need - len(distractors), rng)
    choices = [*distractors, inst.answer]
    rng.shuffle(choices)
    return {
        "task": task.name,
        "prompt": render(frame, inst.fields, rng),
        "choices": choices,
        "answer": choices.index(inst.answer),
    }


def generate(
    split: Split,
    n_per_task: int,
    seed: int = 0,
    groups: tuple[TemplateGroup, ...] | None = None,
) -> list[dict]:
    """``n_per_task`` samples of every domain for ``split``, phrasings cycled evenly.

    No prompt repeats within a split; the splits cannot share a prompt because their frames
    differ (``tests/bench/synthetic/test_tasks.py`` checks both). ``groups`` narrows the split
    to some of its frame groups (the in-distribution diagnostic draws pretraining and
    adaptation frames apart).
    """
    out: list[dict] = []
    chosen = groups or SPLIT_GROUPS[split]
    if not set(chosen) <= set(SPLIT_GROUPS[split]):
        raise ValueError(f"split {split} has frame groups {SPLIT_GROUPS[split]}, not {chosen}")
    for task in TASKS.values():
        rng = _rng(seed, task.name, split, *([] if groups is None else chosen))
        groups_frames = [task.frames[g] for g in chosen]
        styles = task.styles if split == "test" else task.styles[:-1]
        seen: set[str] = set()
        for _ in range(50 * n_per_task):
            if len(seen) == n_per_task:
                break
            # Groups in turn (the pool is half pretraining, half adaptation phrasings), then
            # the frames of the group in turn.
            group = groups_frames[len(seen) % len(groups_frames)]
            frame = group[(len(seen) // len(groups_frames)) % len(group)]
            sample = make_sample(task, rng, frame, styles)
            if sample["prompt"] not in seen:
                seen.add(sample["prompt"])
                out.append(sample)
        else:
            raise ValueError(f"{task.name}: cannot draw {n_per_task} distinct {split} prompts")
    return out


# What each frame field renders to: lets a prompt be traced back to its frame (``frame_of``).
FIELD_PATTERNS = {
    "a": r"\d+",
    "b": r"\d+",
    "s": r"[a-p](?: [a-p])*",
    "xs": r"\d+(?:,? \d+)*",
    "seq": r"\d+(?: \d+)*",
    "facts": r"(?:[A-Z][a-z]+ has the [a-z]+\.)(?: [A-Z][a-z]+ has the [a-z]+\.)*",
    "obj": r"[a-z]+",
    "text": r"[a-z]+(?: [a-z]+)*",
}


@functools.cache
def frame_regex(frame: str) -> re.Pattern[str]:
    """A regex matching any rendering of ``frame`` (any field values of the right kind, any
    shared prefix and cue)."""
    body = re.escape(frame)
    body = re.sub(r"\\\{(\w+)\\\}", lambda m: f"(?:{FIELD_PATTERNS[m.group(1)]})", body)
    prefixes = "|".join(re.escape(p) for p in PREFIXES if p)
    cues = "|".join(re.escape(c) for c in CUES)
    return re.compile(rf"^(?:(?:{prefixes}) )?{body} (?:{cues})$", re.S)


def frame_of(task: str, prompt: str) -> tuple[TemplateGroup, str] | None:
    """The frame group and frame a prompt of ``task`` was rendered from (the longest frame when
    a shorter one also matches, e.g. "Reverse {s}." inside "Reverse the letters {s}.")."""
    found = [
        (group, frame)
        for group, frames in TASKS[task].frames.items()
        for frame in frames
        if frame_regex(frame).match(prompt)
    ]
    return max(found, key=lambda gf: len(gf[1])) if found else None


def lexicon() -> list[str]:
    """Every word of every frame (all groups but ``read``, which only a variant model is
    pretrained on: leaving it out keeps the tokenizer and the background sentences, and so the
    bundled model, independent of it), prefix and domain vocabulary, sorted."""
    text = " ".join(
        [f for t in TASKS.values() for g, frames in t.frames.items() if g != "read" for f in frames]
        + list(PREFIXES)
        + _NAMES
        + _OBJECTS
        + _FILLER
        + [w for ws in _TOPICS.values() for w in ws]
    )
    words = re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", text))
    return sorted({w for w in words} | {w.lower() for w in words})


def background(rng: random.Random, words: list[str]) -> str:
    """A random word sequence: teaches the tokens, never a task."""
    return " ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) + "."


def pretraining_pairs(
    seed: int = 0, read_share: float = 0.0
) -> Iterator[tuple[str, str, str | None, bool]]:
    """An endless, deterministic stream of ``(prompt, answer, domain, router_taught)``: the
    pretraining frames of every domain in turn (router-taught), a share ``read_share`` of them
    replaced by ``read`` frames (not router-taught: the model learns to read and answer them,
    its router is never told where to send them), and ``BACKGROUND_SHARE`` background
    sentences (answer "", domain None). ``read_share=0`` draws nothing extra from the seeded
    stream, so the bundled model's pretraining sequences do not depend on the option."""
    rng = _rng(seed, "pretrain")
    words = lexicon()
    while True:
        for task in TASKS.values():
            if rng.random() < BACKGROUND_SHARE:
                yield background(rng, words), "", None, False
            inst = task.draw(rng)
            taught = not (read_share and rng.random() < read_share)
            frames = task.frames["pretrain" if taught else "read"]
            prompt = render(rng.choice(frames), inst.fields, rng)
            yield prompt, inst.answer, task.name, taught


def tokenizer_corpus(seed: int = 0, n: int = 4000) -> list[str]:
    """Text to train the byte-level BPE on: the pretraining stream, prompts and answers apart
    (as the trainer tokenizes them), plus the lexicon."""
    stream = pretraining_pairs(seed)
    pairs = [next(stream)[:2] for _ in range(n)]
    return [t for pair in pairs for t in pair if t] + lexicon()


def write_splits(
    out_dir: str | Path, seed: int = 0, n_train: int = 200, n_val: int = 50, n_test: int = 100
) -> dict[Split, Path]:
    """Write train.jsonl / val.jsonl / test.jsonl (sizes per domain) into ``out_dir``."""
    out = Path(out_dir)
    sizes: dict[Split, int] = {"train": n_train, "val": n_val, "test": n_test}
    return {s: write_jsonl(generate(s, n, seed), out / f"{s}.jsonl") for s, n in sizes.items()}
