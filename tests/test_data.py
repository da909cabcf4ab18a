"""Tests for hf_deepseek.data: the character tokenizer and the synthetic verifiable tasks."""

import itertools

import pytest
from transformers import AutoTokenizer

from hf_deepseek.data import addition_examples, build_tokenizer, countdown_examples, verify_countdown
from hf_deepseek.data.tokenizer import TAG_TOKENS


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tokenizer_is_deterministic_and_character_level(tokenizer):
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()
    text = 'Use 3 7 25 to make 46.\n(25-7)*3 = 54; 50% of "x" isn\'t y!'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.padding_side == "right"


def test_tags_and_markers_are_single_tokens(tokenizer):
    for token in [*TAG_TOKENS, "<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [token]
    text = "<think>2+2</think><answer>4</answer>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 4 + 3 + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_unknown_characters_map_to_unk(tokenizer):
    ids = tokenizer.encode("a€b", add_special_tokens=False)
    assert ids[1] == tokenizer.unk_token_id and len(ids) == 3


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>Be brief.<|eos|><|user|>1+1?<|eos|><|assistant|>"
    reply = messages + [{"role": "assistant", "content": "2"}]
    assert tokenizer.apply_chat_template(reply, tokenize=False).endswith("<|assistant|>2<|eos|>")


def test_save_and_reload_offline(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|user|>12+34=<|eos|><|assistant|><think>4+2=6</think><answer>46</answer>"
    assert reloaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert reloaded.chat_template == tokenizer.chat_template
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token, reloaded.unk_token) == (
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
        "<|unk|>",
    )
    assert len(reloaded) == len(tokenizer)


def test_addition_is_deterministic_and_correct():
    first = list(addition_examples(50, seed=3, digits=3))
    assert first == list(addition_examples(50, seed=3, digits=3))
    assert first != list(addition_examples(50, seed=4, digits=3))
    for example in first:
        a, b = example["prompt"].removesuffix("=").split("+")
        assert int(a) + int(b) == int(example["answer"]) and max(int(a), int(b)) < 1000


@pytest.mark.parametrize("digits", [1, 2])
def test_addition_splits_are_disjoint(digits):
    def keys(split):
        examples = addition_examples(400, seed=0, digits=digits, split=split)
        return {frozenset(e["prompt"].removesuffix("=").split("+")) for e in examples}

    train, test = keys("train"), keys("test")
    assert train and test and not train & test


@pytest.mark.parametrize("num_numbers", [3, 4])
def test_countdown_solutions_verify(num_numbers):
    examples = list(countdown_examples(300, seed=1, num_numbers=num_numbers))
    assert examples == list(countdown_examples(300, seed=1, num_numbers=num_numbers))
    for example in examples:
        assert len(example["numbers"]) == num_numbers and 1 <= example["target"] <= 100
        assert verify_countdown(example["answer"], example["numbers"], example["target"])
        assert str(example["target"]) in example["prompt"]


def test_countdown_splits_are_disjoint():
    def keys(split):
        return {(tuple(sorted(e["numbers"])), e["target"]) for e in countdown_examples(500, 2, split=split)}

    assert not keys("train") & keys("test")


@pytest.mark.parametrize(
    ("expression", "numbers", "target", "expected"),
    [
        ("(25-7)*3", [3, 7, 25], 54, True),
        ("3*(25-7)", [25, 7, 3], 54, True),
        ("(1+2)/3*6", [1, 2, 3, 6], 6, True),
        ("25-7*3", [3, 7, 25], 54, False),  # wrong value
        ("(25-7)*3*3", [3, 7, 25], 162, False),  # a number used twice
        ("25*3", [3, 7, 25], 75, False),  # a number left out
        ("2**3", [2, 3], 8, False),  # operator not allowed
        ("-3+5", [3, 5], 2, False),  # unary minus not allowed
        ("3/(2-2)", [3, 2, 2], 1, False),  # division by zero
        ("__import__('os')", [1], 1, False),
        ("1.5*2", [2], 3, False),  # not one of the given integers
    ],
)
def test_verify_countdown(expression, numbers, target, expected):
    assert verify_countdown(expression, numbers, target) is expected


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="split"):
        next(addition_examples(1, 0, split="validation"))
    with pytest.raises(ValueError, match="num_numbers"):
        next(countdown_examples(1, 0, num_numbers=5))
    assert list(itertools.islice(countdown_examples(10**9, 0), 2))  # lazy: huge n costs nothing up front
