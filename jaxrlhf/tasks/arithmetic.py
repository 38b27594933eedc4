"""A verifiable task: grade-school arithmetic word problems with integer answers.

Generated from a seed, offline: each problem is a conversational prompt (one user message
that asks for the reply to end with "The answer is N.") with its `answer` (the integer, as
text) and `expression` (the arithmetic the answer is, e.g. "4 * 3 + 2", for checking). Two
rewards in TRL's reward-function signature, `f(prompts, completions, **columns)`, each
completion a text or a list of one assistant message:

- `correctness`: 1.0 when the last number in the reply equals the row's `answer`, else 0.0
  (exact match, TRL's accuracy-style reward);
- `format_reward`: 1.0 when the reply ends with "The answer is N." (N an integer), as the prompt
  asks, else 0.0.
"""

import dataclasses
import random
import re
from pathlib import Path

from jaxrlhf.config import check
from jaxrlhf.errors import ConfigError
from jaxrlhf.parallel import on_main
from jaxrlhf.tasks.politeness import write_jsonl

NAMES = ["Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira", "Liam", "Maya",
         "Noah", "Olga", "Pablo", "Rosa", "Sam", "Tara", "Yusuf"]
THINGS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells", "cards", "eggs",
          "balloons", "coins"]
# Each template: its words ({name}, {friend}, {things}, the numbers {a} {b} {c}), the answer from
# the numbers, and the expression it is as text. The numbers: see `_numbers`.
TEMPLATES = {
    "sum": ("{name} has {a} {things}. {name} gets {b} more. How many {things} does {name} have now?",
            lambda a, b, c: a + b, "{a} + {b}"),
    "difference": ("{name} had {a} {things} and gave {b} of them to {friend}. How many {things} does {name} "
                   "have left?", lambda a, b, c: a - b, "{a} - {b}"),
    "product": ("{name} buys {a} bags with {b} {things} in each bag. How many {things} does {name} buy in all?",
                lambda a, b, c: a * b, "{a} * {b}"),
    "two_step": ("{name} has {a} {things}, gets {b} more, then gives {c} to {friend}. How many {things} does "
                 "{name} have now?", lambda a, b, c: a + b - c, "{a} + {b} - {c}"),
    "groups_plus": ("{name} has {a} boxes of {b} {things} and {c} loose {things}. How many {things} does {name} "
                    "have in all?", lambda a, b, c: a * b + c, "{a} * {b} + {c}"),
}
INSTRUCTION = 'Answer in one short sentence ending with "The answer is N." where N is the number.'


def _numbers(rng: random.Random, kind: str, max_number: int) -> tuple[int, int, int]:
    """(a, b, c) for a template: sums and differences of numbers up to `max_number`, products of
    factors 2..max_number // 2 (at least 2); never a negative answer."""
    small = max(2, max_number // 2)
    if kind == "product" or kind == "groups_plus":
        return rng.randint(2, small), rng.randint(2, small), rng.randint(1, max_number)
    a, b = rng.randint(2, max_number), rng.randint(1, max_number)
    if kind == "difference":
        a, b = max(a, b) + 1, min(a, b)
    return a, b, rng.randint(1, a + b)


def make_problem(rng: random.Random, max_number: int) -> dict:
    """One problem -> {"prompt": [one user message], "answer": "N", "expression": "..."}."""
    kind = rng.choice(sorted(TEMPLATES))
    text, answer_of, expression = TEMPLATES[kind]
    a, b, c = _numbers(rng, kind, max_number)
    name, friend = rng.sample(NAMES, 2)
    question = text.format(name=name, friend=friend, things=rng.choice(THINGS), a=a, b=b, c=c)
    return {"prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}], "answer": str(answer_of(a, b, c)),
            "expression": expression.format(a=a, b=b, c=c)}


def make_problems(n: int, seed: int, max_number: int = 10, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """`n` distinct problems from `seed`, none whose question is in `exclude` (another split's)."""
    rng = random.Random(seed)
    rows, seen = [], set(exclude)
    for _ in range(100 * n):
        row = make_problem(rng, max_number)
        question = row["prompt"][0]["content"]
        if question not in seen:
            seen.add(question)
            rows.append(row)
            if len(rows) == n:
                return rows
    raise ConfigError(f"could not draw {n} distinct problems with max_number={max_number}; raise max_number")


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_FORMAT = re.compile(r"The answer is (-?\d+(?:,\d{3})*)\.?\s*$")


def completion_text(completion) -> str:
    """A completion as text: itself, or the content of a conversational one (TRL passes those as
    a list of one assistant message)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def last_number(text: str) -> float | None:
    """The last number written in `text` (commas as thousands separators allowed), or None."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def correctness(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 for each completion whose last number equals its row's `answer`, else 0.0."""
    del prompts, kwargs
    return [float(last_number(completion_text(c)) == float(a)) for c, a in zip(completions, answer)]


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 for each completion that ends with "The answer is N." (N an integer), else 0.0."""
    del prompts, kwargs
    return [float(_FORMAT.search(completion_text(c).strip()) is not None) for c in completions]


@dataclasses.dataclass(frozen=True)
class ArithmeticDataConfig:
    output_dir: str = "runs/smollm2-math/data"
    seed: int = 0
    train_rows: int = 1024
    eval_rows: int = 128
    max_number: int = 10  # the largest number in a sum or difference (factors: up to half of it)

    def __post_init__(self):
        check(self.train_rows >= 1 and self.eval_rows >= 1,
              f"train_rows={self.train_rows} and eval_rows={self.eval_rows} must be at least 1")
        check(self.max_number >= 2, f"max_number={self.max_number} must be at least 2")


def plan(config: ArithmeticDataConfig) -> str:
    return (f"arithmetic word problems (numbers up to {config.max_number}): {config.train_rows} training + "
            f"{config.eval_rows} held-out prompts -> {config.output_dir}")


def preflight(config: ArithmeticDataConfig, resume: bool = False) -> None:
    """Nothing to check before writing: the data is generated from the config alone."""
    del config, resume


def run(config: ArithmeticDataConfig, resume: bool = False) -> Path:
    """Write prompts.jsonl (training) and eval_prompts.jsonl (held out: another seed, no
    question of the training file)."""
    del resume  # cheap and deterministic: always rebuilt whole
    out = Path(config.output_dir)
    train = make_problems(config.train_rows, config.seed, config.max_number)
    held_out = make_problems(config.eval_rows, config.seed + 1, config.max_number,
                             exclude=frozenset(r["prompt"][0]["content"] for r in train))

    def write():
        write_jsonl(train, out / "prompts.jsonl")
        write_jsonl(held_out, out / "eval_prompts.jsonl")
        print(f"wrote {len(train)} training and {len(held_out)} held-out arithmetic problems to {out}")

    # In a multi-process run, process 0 writes and the others wait: the next stage reads the files.
    on_main(write, out)
    return out
