"""A small safe parser for countdown answers: integers, + - * /, parentheses; never `eval`.

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := INTEGER | "(" expr ")"

Values are exact fractions. Anything else is rejected with a reason: names (and so attribute
access and calls), `**` and `^`, unary signs, decimals, integers longer than MAX_DIGITS, nesting
deeper than MAX_DEPTH, text longer than MAX_CHARS, and division by zero.
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_CHARS = 200
MAX_DIGITS = 6
MAX_DEPTH = 16

_TOKEN_RE = re.compile(r"\s*(?:(\d+)|(\*\*|[-+*/()^])|(\S))")


class ExpressionError(ValueError):
  """The text is not a valid countdown expression; the message says why."""


def tokenize(text: str) -> list[str]:
  """The expression's tokens: integer literals and operators; ExpressionError on anything else."""
  if len(text) > MAX_CHARS:
    raise ExpressionError(f"expression longer than {MAX_CHARS} characters")
  tokens, pos = [], 0
  text = text.rstrip()
  while pos < len(text):
    m = _TOKEN_RE.match(text, pos)
    number, op, other = m.groups()
    pos = m.end()
    if number is not None:
      if len(number) > MAX_DIGITS:
        raise ExpressionError(f"integer literal {number[:12]}... has more than {MAX_DIGITS} digits")
      tokens.append(number)
    elif op in ("**", "^"):
      raise ExpressionError(f"powers ({op!r}) are not allowed")
    elif op is not None:
      tokens.append(op)
    elif other.isalpha() or other == "_":
      raise ExpressionError("names are not allowed (no variables, attributes or calls)")
    elif other == ".":
      raise ExpressionError("'.' is not allowed (no decimals or attributes)")
    else:
      raise ExpressionError(f"character {other!r} is not allowed")
  if not tokens:
    raise ExpressionError("empty expression")
  return tokens


class _Parser:
  def __init__(self, tokens: list[str]):
    self.tokens, self.i, self.numbers = tokens, 0, []

  def peek(self) -> str | None:
    return self.tokens[self.i] if self.i < len(self.tokens) else None

  def take(self) -> str:
    token = self.peek()
    if token is None:
      raise ExpressionError("the expression ends too early")
    self.i += 1
    return token

  def expr(self, depth: int) -> Fraction:
    value = self.term(depth)
    while self.peek() in ("+", "-"):
      op, right = self.take(), self.term(depth)
      value = value + right if op == "+" else value - right
    return value

  def term(self, depth: int) -> Fraction:
    value = self.factor(depth)
    while self.peek() in ("*", "/"):
      op, right = self.take(), self.factor(depth)
      if op == "*":
        value *= right
      elif right == 0:
        raise ExpressionError("division by zero")
      else:
        value /= right
    return value

  def factor(self, depth: int) -> Fraction:
    token = self.take()
    if token == "(":
      if depth >= MAX_DEPTH:
        raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
      value = self.expr(depth + 1)
      if self.take() != ")":
        raise ExpressionError("unbalanced parentheses")
      return value
    if token.isdigit():
      self.numbers.append(int(token))
      return Fraction(int(token))
    if token in ("+", "-"):
      raise ExpressionError("unary signs are not allowed")
    raise ExpressionError(f"unexpected {token!r}")


def evaluate(text: str) -> tuple[Fraction, list[int]]:
  """(exact value, the integer literals used in order) of a countdown expression;
  ExpressionError (a ValueError) with the reason when it is not one."""
  parser = _Parser(tokenize(text))
  value = parser.expr(0)
  if parser.peek() is not None:
    raise ExpressionError(f"unexpected {parser.peek()!r} after a complete expression")
  return value, parser.numbers
