"""The arithmetic word-problem task: the seeded generator, its data stage, and its rewards."""

import ast
import json
import operator
import re

import pytest

from jaxrlhf.tasks import arithmetic

pytestmark = pytest.mark.fast

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expression: str) -> int:
    """An expression of integers, +, - and * evaluated from its syntax tree."""
    def value(node):
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](value(node.left), value(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int)
        return node.value

    return value(ast.parse(expression, mode="eval").body)


def test_problems_are_seeded_and_their_answers_are_their_expressions():
    rows = arithmetic.make_problems(200, seed=3)
    assert rows == arithmetic.make_problems(200, seed=3)
    assert rows != arithmetic.make_problems(200, seed=4)
    assert len({r["prompt"][0]["content"] for r in rows}) == 200
    for row in rows:
        [message] = row["prompt"]
        assert message["role"] == "user" and message["content"].endswith(arithmetic.INSTRUCTION)
        assert int(row["answer"]) == evaluate(row["expression"]) >= 0
        # the question states the expression's numbers, in its order
        question = message["content"].removesuffix(arithmetic.INSTRUCTION)
        assert re.findall(r"\d+", question) == re.findall(r"\d+", row["expression"])
    assert {r["expression"].count(" ") for r in rows} == {2, 4}  # one-step and two-step problems


def test_the_data_stage_writes_held_out_problems_none_of_them_in_training(tmp_path):
    config = arithmetic.ArithmeticDataConfig(output_dir=str(tmp_path), train_rows=300, eval_rows=100, max_number=5)
    arithmetic.run(config)
    train, held_out = ([json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
                       for name in ("prompts.jsonl", "eval_prompts.jsonl"))
    assert (len(train), len(held_out)) == (300, 100)
    assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in held_out}
    assert train == arithmetic.make_problems(300, config.seed, max_number=5)


def test_correctness_and_format_rewards_on_text_and_conversational_replies():
    replies = ["4 + 3 = 7, so she has 7 apples. The answer is 7.",
               "The answer is 7. Wait, 4 + 3 is 8.",
               "She has 1,200 apples. The answer is 1,200",
               "I think the answer is seven.",
               "The answer is 7.0."]
    answers = ["7", "7", "1200", "7", "7"]
    assert arithmetic.correctness(None, replies, answers) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert arithmetic.format_reward(None, replies) == [1.0, 0.0, 1.0, 0.0, 0.0]
    conversational = [[{"role": "assistant", "content": r}] for r in replies]
    assert arithmetic.correctness(None, conversational, answers, expression=["4 + 3"] * 5) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert arithmetic.format_reward(None, conversational, answer=answers) == [1.0, 0.0, 1.0, 0.0, 0.0]
