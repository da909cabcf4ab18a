"""Tests for hf_deepseek.trainers.rewards and the expression parser they use: correct, wrong, malformed and
adversarial completions (huge, deeply nested, division by zero, non-integer results), and bounded time."""

import time

import pytest

from hf_deepseek.data.expressions import ExpressionError, parse_expression
from hf_deepseek.trainers.rewards import (
    REWARD_FUNCS,
    accuracy_reward,
    countdown_reward,
    extract_answer,
    format_reward,
    get_reward_funcs,
    make_cosine_reward,
    make_repetition_penalty,
    tag_count_reward,
)

HUGE = "<think>" + "1+" * 500_000 + "1</think><answer>" + "(" * 100_000 + "</answer>"  # ~1.1 MB
NESTED = "(" * 5000 + "1" + ")" * 5000
BOMB = "9**9**9**9"


def reply(think: str, answer: str) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


def countdown_columns(n: int, numbers=(3, 7, 25), target=54) -> dict:
    return {"task": ["countdown"] * n, "numbers": [list(numbers)] * n, "target": [target] * n}


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


# ------------------------------------------------------------------------------ parser


@pytest.mark.parametrize(
    ("text", "value"),
    [("(25-7)*3", 54), ("1 + 2 * 3", 7), ("(1+2)/3*6", 6), ("7/2", 3.5), ("10 - 4 - 3", 3), ("8/4/2", 1)],
)
def test_parser_values(text, value):
    assert parse_expression(text).value == value


@pytest.mark.parametrize(
    "text",
    ["2**3", "2^3", "-3+5", "1/(2-2)", "__import__('os')", "1.5*2", "(1+2", "1+", "", NESTED, BOMB, "1" * 40, "x"],
)
def test_parser_rejects(text):
    with pytest.raises(ExpressionError):
        parse_expression(text)


def test_parser_unary_minus_only_when_allowed():
    assert parse_expression("-33 * -22 - -8", allow_unary_minus=True).value == 734
    assert parse_expression("-(2+3)", allow_unary_minus=True).value == -5
    with pytest.raises(ExpressionError, match="deeper"):
        parse_expression("-" * 100 + "1", allow_unary_minus=True)


def test_parser_is_fast_on_hostile_input():
    for text in (HUGE, NESTED, BOMB, "(" * 200 + "1" + ")" * 200, "9" * 10**6):
        _, seconds = timed(lambda t=text: pytest.raises(ExpressionError, parse_expression, t))
        assert seconds < 0.05


# ------------------------------------------------------------------------------ extraction


def test_extract_answer_takes_the_last_complete_tag():
    assert extract_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert extract_answer("<answer>1</answer><answer>unclosed") == "1"
    assert extract_answer("no tags") is None and extract_answer("</answer><answer>") is None


# ------------------------------------------------------------------------------ accuracy


def test_accuracy_countdown():
    completions = [
        reply("25-7=18, 18*3=54", "(25-7)*3"),  # correct
        reply("", "3*(25-7) = 54"),  # correct, restating the target
        reply("", "25-7*3"),  # wrong value
        reply("", "(25-7)*3*3"),  # a number used twice
        "(25-7)*3",  # no answer tag
        reply("", "3/(7-7)*25"),  # division by zero
        reply("", "25*3-(7/3)*9"),  # non-integer intermediate, wrong numbers
        reply("", BOMB),
        reply("", NESTED),
    ]
    rewards = accuracy_reward(None, completions, answer=["(25-7)*3"] * len(completions), **countdown_columns(9))
    assert rewards == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_accuracy_countdown_non_integer_intermediate():
    columns = countdown_columns(1, numbers=(1, 3, 4, 6), target=24)
    assert accuracy_reward(None, [reply("", "6/(1-3/4)")], answer=["6/(1-3/4)"], **columns) == [1.0]


def test_accuracy_integer_tasks_are_exact():
    completions = [reply("", "1258"), reply("", " 1258 "), reply("", "1258.0"), reply("", "1,258"), reply("", "1259")]
    columns = {"task": ["addition"] * 5}
    assert accuracy_reward(None, completions, answer=["1258"] * 5, **columns) == [1.0, 1.0, 0.0, 0.0, 0.0]
    negative = accuracy_reward(None, [reply("", "-3162")], answer=["-3162"], task=["arithmetic"])
    assert negative == [1.0]


def test_accuracy_math_answers():
    golds = ["28", "0.5", "1/2", "\\frac{3}{4}", "208"]
    completions = [reply("", "28.0"), reply("", "1/2"), reply("", "0.5"), reply("", "0.75"), reply("", "$208")]
    assert accuracy_reward(None, completions, answer=golds, task=["gsm_symbolic"] * 5) == [1.0] * 5
    wrong = [reply("", "29"), reply("", "x+"), reply("", "\\frac{1}{0}"), "no answer", reply("", "1" * 300)]
    assert accuracy_reward(None, wrong, answer=["28"] * 5, task=["gsm_symbolic"] * 5) == [0.0] * 5


def test_accuracy_math_refuses_power_towers_quickly():
    bombs = [reply("", text) for text in (BOMB, "9**99999999", "9^99999999", "2^{3^{4^{5}}}", NESTED)]
    rewards, seconds = timed(accuracy_reward, None, bombs, answer=["28"] * 5, task=["gsm_symbolic"] * 5)
    assert rewards == [0.0] * 5 and seconds < 1.0


def test_accuracy_accepts_conversations_and_skips_rows_without_gold():
    completions = [[{"role": "assistant", "content": reply("", "4")}], [{"role": "assistant", "content": "x"}]]
    assert accuracy_reward(None, completions, answer=["4", None], task=["arithmetic"] * 2) == [1.0, None]
    with pytest.raises(ValueError, match="answer"):
        accuracy_reward(None, ["x"])


# ------------------------------------------------------------------------------ format, tags


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (reply("2+2=4", "4"), 1.0),
        ("  <think>a\nb</think>\n<answer>4</answer>\n", 1.0),
        (reply("", "4"), 1.0),
        ("<think>x</think><answer> </answer>", 0.0),  # empty answer
        ("<answer>4</answer><think>x</think>", 0.0),  # wrong order
        ("<think>x</think>text<answer>4</answer>", 0.0),  # text between
        ("<think>x</think><answer>4</answer> more", 0.0),  # text after
        ("<think>x<think>y</think><answer>4</answer>", 0.0),  # a tag twice
        ("<think>x</think>", 0.0),
        ("", 0.0),
        (HUGE, 1.0),  # a megabyte, well formed
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(None, [completion]) == [expected]


def test_tag_count_reward():
    completions = [reply("x", "4"), "<think>x</think>", "<think><think></think>", "nothing", HUGE]
    assert tag_count_reward(None, completions) == [1.0, 0.5, 0.25, 0.0, 1.0]


# ------------------------------------------------------------------------------ countdown


def test_countdown_reward_follows_tinyzero():
    completions = [
        reply("", "(25-7)*3"),  # correct: 1
        reply("", "25+7+3"),  # a valid expression, wrong value: 0.1
        reply("", "25 + 7 +"),  # not an expression: 0
        "(25-7)*3",  # no answer tag: 0
        reply("", "3/(7-7)"),  # division by zero: not an expression of value: 0
        reply("", BOMB),
        reply("", NESTED),
    ]
    rewards = countdown_reward(None, completions, **countdown_columns(len(completions)))
    assert rewards == [1.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_countdown_reward_skips_other_tasks():
    rewards = countdown_reward(
        None, ["a", "b"], task=["arithmetic", "countdown"], numbers=[[], [1, 2]], target=[None, 3]
    )
    assert rewards[0] is None and rewards[1] == 0.0


# ------------------------------------------------------------------------------ cosine, repetition


def test_cosine_reward_prefers_short_correct_and_long_wrong():
    cosine = make_cosine_reward(max_len=100)
    right, wrong = reply("", "4"), reply("", "5")
    short, long = [[0] * 10], [[0] * 100]
    kw = {"answer": ["4"], "task": ["arithmetic"]}
    right_short, right_long = cosine(None, [right], short, **kw)[0], cosine(None, [right], long, **kw)[0]
    wrong_short, wrong_long = cosine(None, [wrong], short, **kw)[0], cosine(None, [wrong], long, **kw)[0]
    assert 1.0 >= right_short > right_long == pytest.approx(0.5)
    assert -1.0 <= wrong_short < wrong_long == pytest.approx(-0.5)
    assert cosine(None, ["junk"], answer=[None])[0] is None


def test_repetition_penalty():
    penalty = make_repetition_penalty(ngram_size=2, max_penalty=-1.0)
    fresh, looping = "a b c d e", "a b a b a b a b"
    assert penalty(None, [fresh, looping, "a"]) == [0.0, pytest.approx(-5 / 7), 0.0]
    with pytest.raises(ValueError):
        make_repetition_penalty(max_penalty=1.0)


# ------------------------------------------------------------------------------ registry, limits


def test_registry_builds_named_and_parameterised_functions():
    funcs = get_reward_funcs(["accuracy", "format", {"name": "cosine", "max_len": 64}, "repetition"])
    assert [f.__name__ for f in funcs] == [
        "accuracy_reward",
        "format_reward",
        "cosine_scaled_reward",
        "repetition_penalty_reward",
    ]
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward_funcs(["nope"])
    with pytest.raises(ValueError, match="no options"):
        get_reward_funcs([{"name": "format", "x": 1}])


@pytest.mark.parametrize("name", sorted(REWARD_FUNCS))
def test_every_reward_is_fast_on_a_megabyte_and_on_pathological_answers(name):
    completions = [HUGE, reply("", NESTED), reply("", BOMB), reply("", "9**99999999"), "x" * 10**6 + " y" * 10**5]
    columns = {
        "answer": ["54"] * 5,
        "task": ["countdown", "gsm_symbolic", "arithmetic", "gsm_symbolic", "countdown"],
        "numbers": [[3, 7, 25]] * 5,
        "target": [54] * 5,
    }
    accuracy_reward(None, [reply("", "1/2")], answer=["0.5"], task=["gsm_symbolic"])  # math-verify's one-off import
    rewards, seconds = timed(REWARD_FUNCS[name], [None] * 5, completions, None, **columns)
    assert len(rewards) == 5 and all(r is None or -1.0 <= r <= 1.0 for r in rewards)
    assert seconds < 1.0, f"{name} took {seconds:.2f} s"
