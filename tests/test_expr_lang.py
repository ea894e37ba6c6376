"""The tiny expression language's evaluator (eval/expr_lang.py): values equal Python integer arithmetic on generated
programs, and everything outside the grammar or its limits is refused with the reason in the message."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eval.expr_lang import MAX_DEPTH, MAX_LENGTH, MAX_VALUE, ExprError, evaluate, free_names, parse

# A generated program is a tree together with its source text; the reference value is computed from the tree with
# Python's own integer operators (never by evaluating the text).
ENV = {"x": 7, "y": -3}
OPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "//": lambda a, b: a // b,
    "%": lambda a, b: a % b,
}


class Refused(Exception):
    pass


def _check(value: int) -> int:
    if abs(value) > MAX_VALUE:
        raise Refused
    return value


def _reference(tree) -> int:
    kind = tree[0]
    if kind == "int":
        return tree[1]
    if kind == "name":
        return ENV[tree[1]]
    if kind == "neg":
        return _check(-_reference(tree[1]))
    if kind == "call":
        values = [_reference(arg) for arg in tree[2]]
        return {"min": min, "max": max}[tree[1]](values) if tree[1] != "abs" else abs(values[0])
    a, b = _reference(tree[2]), _reference(tree[3])
    if tree[1] in ("//", "%") and b == 0:
        raise Refused
    if tree[1] == "**":
        return _check(a**b)
    return _check(OPS[tree[1]](a, b))


def _source(tree) -> str:
    # Fully parenthesised, so the text means the tree whatever the precedence rules.
    kind = tree[0]
    if kind == "int":
        return str(tree[1])
    if kind == "name":
        return tree[1]
    if kind == "neg":
        return f"(-({_source(tree[1])}))"
    if kind == "call":
        return f"{tree[1]}({', '.join(_source(arg) for arg in tree[2])})"
    return f"({_source(tree[2])} {tree[1]} {_source(tree[3])})"


leaves = st.one_of(st.tuples(st.just("int"), st.integers(0, 50)), st.tuples(st.just("name"), st.sampled_from("xy")))


def _extend(children):
    return st.one_of(
        st.tuples(st.just("bin"), st.sampled_from(sorted(OPS)), children, children),
        st.tuples(st.just("neg"), children),
        st.tuples(st.just("call"), st.just("abs"), st.tuples(children)),
        st.tuples(st.just("call"), st.sampled_from(["min", "max"]), st.lists(children, min_size=2, max_size=3)),
        st.tuples(st.just("bin"), st.just("**"), children, st.tuples(st.just("int"), st.integers(0, 3))),
    )


trees = st.recursive(leaves, _extend, max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(trees)
def test_values_match_python_integer_arithmetic(tree):
    source = _source(tree)
    try:
        expected = _reference(tree)
    except Refused:
        with pytest.raises(ExprError, match="by zero|exceeds the bound"):
            evaluate(source, ENV)
        return
    assert evaluate(source, ENV) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["+", "-", "*", "//", "%"]), st.integers(1, 9)), min_size=1, max_size=5))
def test_precedence_and_associativity_without_parentheses(steps):
    # Python's precedence: * // % before + -, all left-associative.
    source = "x" + "".join(f" {op} {a}" for op, a in steps)
    terms, term = [], ENV["x"]
    sign = 1
    for op, a in steps:  # reference: fold the multiplicative runs, then sum them with their signs
        if op in ("+", "-"):
            terms.append(sign * term)
            term, sign = a, 1 if op == "+" else -1
        else:
            term = OPS[op](term, a)
    assert evaluate(source, ENV) == sum(terms) + sign * term


def test_powers_and_floor_division_follow_python():
    assert evaluate("-2 ** 2") == -(2**2) and evaluate("2 ** 3 ** 2") == 2 ** (3**2)
    assert evaluate("-7 // 2 * 3") == (-7 // 2) * 3 and evaluate("-7 % 3") == -7 % 3 and evaluate("7 % -3") == 7 % -3


def test_let_binds_a_name_in_its_body():
    assert evaluate("let z = x + 1 in z * z", ENV) == 64
    assert evaluate("let x = 2 in let y = x * 3 in x + y", ENV) == 8  # shadows the inputs
    assert free_names("let z = x in z + y") == {"x", "y"}
    with pytest.raises(ExprError, match="name 'z' is not bound"):
        evaluate("(let z = 1 in z) + z", ENV)


@pytest.mark.parametrize(
    "source, reason",
    [
        ("q + 1", "name 'q' is not bound"),
        ("x.real", "attribute access"),
        ("().__class__", "attribute access"),
        ("open(1)", "call of 'open' .* not allowed"),
        ("__import__(x)", "call of '__import__' .* not allowed"),
        ("x[0]", "subscript"),
        ("lambda: 1", "keyword 'lambda'"),
        ("x if y else 1", "keyword 'if'"),
        ("'a' * 3", "string literal"),
        ("2 ** 99", "exponent 99 is too large"),
        ("99 ** 30", "exceeds the bound"),
        ("2 ** -1", "negative exponent"),
        ("10000000000000", "exceeds the bound"),
        ("999999 * 999999 * 999999", "exceeds the bound"),
        ("x // 0", "division by zero"),
        ("x % (y + 3)", "remainder by zero"),
        ("1.5 + x", "decimal point"),
        ("x / 2", "true division"),
        ("abs(x, y)", "abs\\(\\) .* takes exactly one argument"),
        ("min(x)", "min\\(\\) .* takes at least two arguments"),
        ("max", "function 'max' .* must be called"),
        ("x = 3", "unexpected '='"),
        ("(x + 1", "expected '\\)'"),
        ("x +", "expected a number"),
        ("", "empty program"),
        ("x; y", "character ';'"),
        ("let in = 3 in 1", "'let' .* must be followed by a variable name"),
        ("+x", "unary '\\+'"),
    ],
)
def test_refusals_name_the_reason(source, reason):
    with pytest.raises(ExprError, match=reason):
        evaluate(source, ENV)


def test_size_limits():
    deep = "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1)
    with pytest.raises(ExprError, match=f"nesting deeper than {MAX_DEPTH} levels"):
        parse(deep)
    assert evaluate("(" * (MAX_DEPTH - 1) + "1" + ")" * (MAX_DEPTH - 1)) == 1
    with pytest.raises(ExprError, match=f"nesting deeper than {MAX_DEPTH}"):
        parse("-" * (MAX_DEPTH + 1) + "1")
    with pytest.raises(ExprError, match=f"too long \\(at most {MAX_LENGTH}\\)"):
        parse("1" + " + 1" * MAX_LENGTH)
    with pytest.raises(ExprError, match="a program is a string"):
        parse(3)


def test_inputs_are_checked():
    with pytest.raises(ExprError, match="input 'x' must be an integer"):
        evaluate("x", {"x": 1.5})
    with pytest.raises(ExprError, match="input 'x' must be an integer"):
        evaluate("x", {"x": True})
    with pytest.raises(ExprError, match="not a valid name"):
        evaluate("1", {"a b": 1})
    with pytest.raises(ExprError, match="exceeds the bound"):
        evaluate("x", {"x": MAX_VALUE + 1})


def test_error_is_a_value_error():
    assert issubclass(ExprError, ValueError)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("\uff13 + 1", "non-ASCII digit"),  # fullwidth 3
        ("3 + \u0664", "non-ASCII digit"),  # Arabic-Indic 4
        ("1\u3000+ 1", "whitespace '.u3000'"),  # ideographic space
        ("1 +\u20281", "whitespace '.u2028'"),  # line separator
        ("1\x0b+ 1", "whitespace '.x0b'"),  # vertical tab: ASCII, but not one of the allowed spaces
    ],
)
def test_only_ascii_digits_and_plain_whitespace(source, reason):
    with pytest.raises(ExprError, match=reason):
        evaluate(source)


def test_plain_whitespace_is_accepted():
    assert evaluate(" 1\t+\n2\r\n") == 3
