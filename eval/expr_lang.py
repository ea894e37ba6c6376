"""A tiny expression language and its safe evaluator: the answers of the `coding` capability are programs in it.

Model output is never handed to Python's `eval`/`exec` (nor to `ast`): this module has its own tokenizer and
recursive-descent parser, so anything outside the grammar below is refused by construction, with an `ExprError`
that names what was refused.

    program := expr
    expr    := "let" NAME "=" expr "in" expr   # binds NAME inside the second expr
             | sum
    sum     := term (("+" | "-") term)*
    term    := unary (("*" | "//" | "%") unary)*
    unary   := "-" unary | power
    power   := atom ("**" unary)?              # right-associative, binds tighter than unary minus on its left
    atom    := INT | NAME | FUNC "(" expr ("," expr)* ")" | "(" expr ")"
    FUNC    := "min" | "max" | "abs"           # abs takes one argument, min/max two or more

Values are Python integers with Python's semantics (`//` and `%` floor, `-7 // 2 == -4`, `-7 % 2 == 1`). Limits,
each refused with its own message: at most `MAX_LENGTH` characters, `MAX_DEPTH` levels of nesting (parentheses, calls, unary minus, powers, `let`), literals and
every intermediate value within +-`MAX_VALUE`, exponents from 0 to `MAX_EXPONENT`, division or remainder by zero.
Names are the caller's inputs (`evaluate("x * 2", {"x": 3})`) and `let` bindings; any other name is refused.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["MAX_DEPTH", "MAX_EXPONENT", "MAX_LENGTH", "MAX_VALUE", "ExprError", "evaluate", "free_names", "parse"]

MAX_LENGTH = 256
MAX_DEPTH = 24
MAX_VALUE = 10**12
MAX_EXPONENT = 32
FUNCTIONS = ("min", "max", "abs")
KEYWORDS = ("let", "in")


class ExprError(ValueError):
    """A program outside the language or its limits; the message names what was refused."""


# ---------------------------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------------------------

# ASCII only: `\d` and `str.isspace` would also take other scripts' digits ("٤") and spaces (U+3000, U+2028).
_TOKEN_RE = re.compile(r"(?:([0-9]+)|([A-Za-z_][A-Za-z0-9_]*)|(\*\*|//|[-+*%(),=]))", re.ASCII)
_WHITESPACE = " \t\n\r"


@dataclass(frozen=True)
class _Token:
    kind: str  # "int", "name", "op", "end"
    text: str
    position: int


def _tokenize(source: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while True:
        while position < len(source) and source[position] in _WHITESPACE:
            position += 1
        if position == len(source):
            tokens.append(_Token("end", "", position))
            return tokens
        match = _TOKEN_RE.match(source, position)
        if match is None:
            raise ExprError(_bad_character(source, position, tokens))
        number, name, op = match.groups()
        if number is not None:
            tokens.append(_Token("int", number, match.start(1)))
        elif name is not None:
            if keyword.iskeyword(name) and name not in KEYWORDS:
                raise ExprError(f"keyword {name!r} at position {match.start(2)} is not part of the language")
            tokens.append(_Token("name", name, match.start(2)))
        else:
            tokens.append(_Token("op", op, match.start(3)))
        position = match.end()


def _bad_character(source: str, position: int, tokens: list[_Token]) -> str:
    char = source[position]
    where = f"at position {position}"
    if char == ".":
        previous = tokens[-1] if tokens else None
        if previous is not None and previous.kind == "int":
            return f"decimal point {where}: only integers are allowed"
        return f"attribute access ('.') {where} is not allowed"
    if char in "[]":
        return f"subscript ('{char}') {where} is not allowed"
    if char in "'\"":
        return f"string literal {where} is not allowed"
    if char == "/":
        return f"true division ('/') {where} is not allowed: use '//' (floor division)"
    if char.isdigit():
        return f"non-ASCII digit {char!r} {where} is not allowed: use the digits 0-9"
    if char.isspace():
        return f"whitespace {char!r} {where} is not allowed: use spaces, tabs or newlines"
    return f"character {char!r} {where} is not part of the language"


# ---------------------------------------------------------------------------------------------------------------
# Syntax tree: ("int", value) | ("name", name) | ("neg", e) | ("bin", op, a, b) | ("call", f, args)
# | ("let", name, bound, body)
# ---------------------------------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, source: str):
        self.tokens = _tokenize(source)
        self.index = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def expect(self, text: str) -> None:
        token = self.take()
        if token.text != text or token.kind not in ("op", "name"):
            found = "the end of the program" if token.kind == "end" else repr(token.text)
            raise ExprError(f"expected {text!r} at position {token.position}, found {found}")

    def nested(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExprError(f"nesting deeper than {MAX_DEPTH} levels is not allowed")

    def program(self) -> tuple:
        tree = self.expr()
        token = self.peek()
        if token.kind != "end":
            raise ExprError(f"unexpected {token.text!r} at position {token.position} after a complete expression")
        return tree

    def expr(self) -> tuple:
        token = self.peek()
        if token.kind != "name" or token.text != "let":
            return self.sum()
        self.nested()
        self.take()
        name = self.take()
        if name.kind != "name" or name.text in KEYWORDS or name.text in FUNCTIONS:
            raise ExprError(f"'let' at position {token.position} must be followed by a variable name")
        self.expect("=")
        bound = self.expr()
        self.expect("in")
        tree = ("let", name.text, bound, self.expr())
        self.depth -= 1
        return tree

    def sum(self) -> tuple:
        tree = self.term()
        while self.peek().kind == "op" and self.peek().text in ("+", "-"):
            tree = ("bin", self.take().text, tree, self.term())
        return tree

    def term(self) -> tuple:
        tree = self.unary()
        while self.peek().kind == "op" and self.peek().text in ("*", "//", "%"):
            tree = ("bin", self.take().text, tree, self.unary())
        return tree

    def unary(self) -> tuple:
        if self.peek().kind == "op" and self.peek().text == "-":
            self.take()
            self.nested()
            tree = ("neg", self.unary())
            self.depth -= 1
            return tree
        if self.peek().kind == "op" and self.peek().text == "+":
            raise ExprError(f"unary '+' at position {self.peek().position} is not part of the language")
        return self.power()

    def power(self) -> tuple:
        tree = self.atom()
        if self.peek().kind == "op" and self.peek().text == "**":
            self.take()
            self.nested()
            tree = ("bin", "**", tree, self.unary())
            self.depth -= 1
        return tree

    def atom(self) -> tuple:
        token = self.take()
        if token.kind == "int":
            value = int(token.text)
            if value > MAX_VALUE:
                raise ExprError(f"literal {token.text} at position {token.position} exceeds the bound {MAX_VALUE}")
            return ("int", value)
        if token.kind == "name":
            if token.text in KEYWORDS:
                raise ExprError(f"unexpected keyword {token.text!r} at position {token.position}")
            if self.peek().kind == "op" and self.peek().text == "(":
                if token.text not in FUNCTIONS:
                    raise ExprError(
                        f"call of {token.text!r} at position {token.position} is not allowed: the only functions "
                        f"are {', '.join(FUNCTIONS)}"
                    )
                return self.call(token)
            if token.text in FUNCTIONS:
                raise ExprError(f"function {token.text!r} at position {token.position} must be called")
            return ("name", token.text)
        if token.kind == "op" and token.text == "(":
            self.nested()
            tree = self.expr()
            self.expect(")")
            self.depth -= 1
            return tree
        found = "the end of the program" if token.kind == "end" else repr(token.text)
        raise ExprError(f"expected a number, a name or '(' at position {token.position}, found {found}")

    def call(self, function: _Token) -> tuple:
        self.expect("(")
        self.nested()
        args = [self.expr()]
        while self.peek().kind == "op" and self.peek().text == ",":
            self.take()
            args.append(self.expr())
        self.expect(")")
        self.depth -= 1
        wanted = "exactly one argument" if function.text == "abs" else "at least two arguments"
        if (function.text == "abs") != (len(args) == 1):
            raise ExprError(f"{function.text}() at position {function.position} takes {wanted}, got {len(args)}")
        return ("call", function.text, tuple(args))


def parse(source: str) -> tuple:
    """The syntax tree of `source`; `ExprError` for anything outside the grammar or its size limits."""
    if not isinstance(source, str):
        raise ExprError(f"a program is a string, got {type(source).__name__}")
    if len(source) > MAX_LENGTH:
        raise ExprError(f"program of {len(source)} characters is too long (at most {MAX_LENGTH})")
    if not source.strip():
        raise ExprError("empty program")
    return _Parser(source).program()


def free_names(source: str) -> set[str]:
    """The names `source` reads that no `let` inside it binds: the inputs it expects."""

    def walk(tree: tuple, bound: frozenset[str]) -> set[str]:
        kind = tree[0]
        if kind == "int":
            return set()
        if kind == "name":
            return set() if tree[1] in bound else {tree[1]}
        if kind == "neg":
            return walk(tree[1], bound)
        if kind == "bin":
            return walk(tree[2], bound) | walk(tree[3], bound)
        if kind == "call":
            return set().union(*(walk(arg, bound) for arg in tree[2]))
        return walk(tree[2], bound) | walk(tree[3], bound | {tree[1]})

    return walk(parse(source), frozenset())


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


def _bounded(value: int) -> int:
    if abs(value) > MAX_VALUE:
        raise ExprError(f"a value exceeds the bound {MAX_VALUE}")
    return value


def _power(base: int, exponent: int) -> int:
    if exponent < 0:
        raise ExprError("negative exponent is not allowed (only integers)")
    if exponent > MAX_EXPONENT:
        raise ExprError(f"exponent {exponent} is too large (at most {MAX_EXPONENT})")
    if abs(base) > 1 and exponent * (abs(base).bit_length() - 1) > MAX_VALUE.bit_length():
        raise ExprError(f"a value exceeds the bound {MAX_VALUE}")  # refused before computing a huge power
    return _bounded(base**exponent)


def _binary(op: str, a: int, b: int) -> int:
    if op == "+":
        return _bounded(a + b)
    if op == "-":
        return _bounded(a - b)
    if op == "*":
        return _bounded(a * b)
    if op == "**":
        return _power(a, b)
    if b == 0:
        raise ExprError(("division" if op == "//" else "remainder") + " by zero")
    return _bounded(a // b if op == "//" else a % b)


def _evaluate(tree: tuple, env: Mapping[str, int]) -> int:
    kind = tree[0]
    if kind == "int":
        return tree[1]
    if kind == "name":
        if tree[1] not in env:
            bound = ", ".join(sorted(env)) or "none"
            raise ExprError(f"name {tree[1]!r} is not bound (bound names: {bound})")
        return env[tree[1]]
    if kind == "neg":
        return _bounded(-_evaluate(tree[1], env))
    if kind == "bin":
        return _binary(tree[1], _evaluate(tree[2], env), _evaluate(tree[3], env))
    if kind == "call":
        values = [_evaluate(arg, env) for arg in tree[2]]
        return abs(values[0]) if tree[1] == "abs" else (min if tree[1] == "min" else max)(values)
    _, name, bound, body = tree
    return _evaluate(body, {**env, name: _evaluate(bound, env)})


def evaluate(source: str, env: Mapping[str, int] | None = None) -> int:
    """The value of the program `source` with the inputs `env` bound (name -> integer).

    Raises `ExprError` (a `ValueError`) naming the problem for anything outside the grammar or its limits: unbound
    names, attribute access, calls other than min/max/abs, subscripts, strings, floats, lambdas and other keywords,
    too long or too deeply nested programs, values past the bound, huge exponents, division by zero.
    """
    env = dict(env or {})
    for name, value in env.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in KEYWORDS:
            raise ExprError(f"input name {name!r} is not a valid name")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ExprError(f"input {name!r} must be an integer, got {type(value).__name__}")
        _bounded(value)
    return _evaluate(parse(source), env)
