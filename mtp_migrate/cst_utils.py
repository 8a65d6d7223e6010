"""Small LibCST helpers shared by the loop analysis, the commands and the verifier."""

from __future__ import annotations

import ast

import libcst as cst

_EMPTY = cst.Module(body=[])


def code(node: cst.CSTNode) -> str:
    """The source text of a node, as LibCST prints it."""
    return _EMPTY.code_for_node(node)


def dotted(node: cst.BaseExpression) -> str | None:
    """``a.b.c`` for a chain of names and attributes, else ``None``."""
    if isinstance(node, cst.Name):
        return node.value
    if isinstance(node, cst.Attribute):
        inner = dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr.value}"
    return None


def literal_int(node: cst.BaseExpression) -> int | None:
    """The value of an integer literal in any spelling (``0x10``, ``1_000``, ``(512)``, ``-3``), else ``None``."""
    if not isinstance(node, cst.Integer | cst.UnaryOperation):
        return None
    try:
        value = ast.literal_eval(code(node).strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def literal_number(node: cst.BaseExpression) -> float | int | None:
    """An int or float literal's value (any spelling, parentheses allowed), else ``None``."""
    if not isinstance(node, cst.Integer | cst.Float | cst.UnaryOperation):
        return None
    try:
        value = ast.literal_eval(code(node).strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def string_value(node: cst.BaseExpression) -> str | None:
    """The value of a plain string literal, else ``None``."""
    if isinstance(node, cst.SimpleString):
        value = node.evaluated_value
        return value if isinstance(value, str) else None
    return None


def unparenthesized(node: cst.BaseExpression) -> cst.BaseExpression:
    return node.with_changes(lpar=(), rpar=()) if getattr(node, "lpar", None) else node
