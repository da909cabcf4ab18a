"""Exact, bounded parsing of integer + - * / arithmetic, for Countdown answers and cold-start solution steps.

A small recursive-descent parser (never `eval`, never `ast`) that builds an expression tree valued in exact
`Fraction`s. Length, nesting depth and literal size are capped before any work is done, so a hostile input
(megabytes of text, thousands of nested brackets, `2**9**9`) costs microseconds and raises `ExpressionError`.
"""

import re
from dataclasses import dataclass
from fractions import Fraction

MAX_CHARS = 256
MAX_DEPTH = 32
MAX_DIGITS = 12
_TOKEN = re.compile(r"\s*(?:(\d+)|([-+*/()]))")


class ExpressionError(ValueError):
    """The text is not an allowed expression: bad syntax, a forbidden operator, too big, or division by zero."""


@dataclass(frozen=True)
class Node:
    """A literal (`op` is None) or an operation; `value` is the exact value of the subtree."""

    value: Fraction
    op: str | None = None
    left: "Node | None" = None
    right: "Node | None" = None  # None for unary minus

    def literals(self) -> list[int]:
        """The integer literals in left-to-right order."""
        if self.op is None:
            return [int(self.value)]
        return self.left.literals() + (self.right.literals() if self.right is not None else [])


def _tokens(text: str) -> list[str]:
    tokens, position, end = [], 0, len(text.rstrip())
    while position < end:
        match = _TOKEN.match(text, position)
        if match is None:
            raise ExpressionError(f"unexpected character {text[position:].lstrip()[:1]!r}")
        literal = match.group(1)
        if literal is not None and len(literal) > MAX_DIGITS:
            raise ExpressionError(f"number longer than {MAX_DIGITS} digits")
        tokens.append(literal if literal is not None else match.group(2))
        position = match.end()
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary)* ; unary := '-' unary | atom ;
    atom := INT | '(' expr ')'."""

    def __init__(self, tokens: list[str], allow_unary_minus: bool):
        self.tokens, self.position, self.allow_unary_minus = tokens, 0, allow_unary_minus

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ExpressionError("unexpected end of expression")
        self.position += 1
        return token

    def expr(self, depth: int) -> Node:
        node = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term(depth)
            node = Node(node.value + right.value if op == "+" else node.value - right.value, op, node, right)
        return node

    def term(self, depth: int) -> Node:
        node = self.unary(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            if self.peek() in ("*", "/"):
                raise ExpressionError(f"operator {op}{self.peek()} is not allowed")
            right = self.unary(depth)
            if op == "/" and right.value == 0:
                raise ExpressionError("division by zero")
            node = Node(node.value * right.value if op == "*" else node.value / right.value, op, node, right)
        return node

    def unary(self, depth: int) -> Node:
        if self.peek() == "-":
            if not self.allow_unary_minus:
                raise ExpressionError("unary minus is not allowed")
            if depth >= MAX_DEPTH:
                raise ExpressionError(f"nested deeper than {MAX_DEPTH}")
            self.take()
            operand = self.unary(depth + 1)
            return Node(-operand.value, "neg", operand)
        return self.atom(depth)

    def atom(self, depth: int) -> Node:
        token = self.take()
        if token == "(":
            if depth >= MAX_DEPTH:
                raise ExpressionError(f"nested deeper than {MAX_DEPTH}")
            node = self.expr(depth + 1)
            if self.take() != ")":
                raise ExpressionError("missing )")
            return node
        if token.isdigit():
            return Node(Fraction(int(token)))
        raise ExpressionError(f"unexpected {token!r}")


def parse_expression(text: str, allow_unary_minus: bool = False) -> Node:
    """Parse `text` into a valued tree; raise `ExpressionError` for anything but integers, + - * / and brackets."""
    if len(text) > MAX_CHARS:
        raise ExpressionError(f"longer than {MAX_CHARS} characters")
    parser = _Parser(_tokens(text), allow_unary_minus)
    node = parser.expr(0)
    if parser.peek() is not None:
        raise ExpressionError(f"unexpected {parser.peek()!r}")
    return node


def format_number(value: Fraction) -> str:
    """`7`, `-3`, or `7/2` for a non-integer."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def countdown_value(expression: str, numbers: list[int]) -> Fraction | None:
    """The value of a Countdown answer that uses each of `numbers` exactly once; None if it is not one."""
    try:
        node = parse_expression(expression)
    except ExpressionError:
        return None
    return node.value if sorted(node.literals()) == sorted(numbers) else None
