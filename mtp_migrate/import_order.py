"""Where a new import goes, as ruff's isort rules (and isort's defaults) put it.

Sections, in order: ``__future__``, the standard library, third-party, first-party and
relative imports, one blank line between them. Within a section, ``import x`` lines come
before ``from x import ...`` lines, each sorted by module, ignoring case (relative imports
furthest first). Names in one import are sorted constants, then classes, then the rest.
An import longer than the project's line length is wrapped one name per line, with a
trailing comma. What decides first-party is the caller's (``project.first_party``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import libcst as cst
import libcst.matchers as m

from mtp_migrate.cst_utils import code, dotted

FUTURE, STDLIB, THIRD_PARTY, FIRST_PARTY, LOCAL = range(5)
FirstParty = Callable[[str], bool]  # absolute module name -> first-party?

_DOCSTRING = m.SimpleStatementLine(body=[m.Expr(m.SimpleString() | m.ConcatenatedString())])
_IMPORT = m.SimpleStatementLine(body=[m.Import() | m.ImportFrom()])


def section(statement: cst.CSTNode, first_party: FirstParty) -> int | None:
    """The section of a line holding one import; ``None`` for any other statement."""
    if not m.matches(statement, _IMPORT):
        return None
    node = statement.body[0]
    if isinstance(node, cst.ImportFrom) and node.relative:
        return LOCAL
    module = dotted(node.module) if isinstance(node, cst.ImportFrom) else dotted(node.names[0].name)
    if module == "__future__":
        return FUTURE
    if module.split(".")[0] in sys.stdlib_module_names:
        return STDLIB
    return FIRST_PARTY if first_party(module) else THIRD_PARTY


def _order(statement: cst.SimpleStatementLine) -> tuple:
    node = statement.body[0]
    if isinstance(node, cst.Import):
        return 0, 0, dotted(node.names[0].name).lower()
    return 1, -len(node.relative), dotted(node.module).lower() if node.module else ""


def member_order(name: str) -> tuple:
    """ruff's ``order-by-type``: CONSTANTS, then Classes, then the rest, each ignoring case."""
    kind = 0 if name.isupper() and len(name) > 1 else 1 if name[:1].isupper() else 2
    return kind, name.lower(), name


def insert(module: cst.Module, statement: cst.SimpleStatementLine, first_party: FirstParty) -> cst.Module:
    """``module`` with ``statement`` (one import) in its section of the import block at the top."""
    body = list(module.body)
    start = 1 if body and m.matches(body[0], _DOCSTRING) else 0
    end = start
    while end < len(body) and section(body[end], first_party) is not None:
        end += 1
    ours, key = section(statement, first_party), _order(statement)
    kinds = {index: section(body[index], first_party) for index in range(start, end)}
    same = [index for index, kind in kinds.items() if kind == ours]
    earlier = [index for index, kind in kinds.items() if kind < ours]
    if same:
        position = next((index for index in same if _order(body[index]) > key), same[-1] + 1)
    else:
        position = earlier[-1] + 1 if earlier else start
    # One blank line after the docstring and between sections; inside a section, the file's own spacing.
    opens_section = position == start > 0 or kinds.get(position - 1, ours) < ours
    statement = statement.with_changes(leading_lines=[cst.EmptyLine()] if opens_section else [])
    if position < end and (opens_section or kinds[position] > ours):  # the import after it keeps its comments
        blank, comments = _split(body[position].leading_lines)
        blank = (blank or [cst.EmptyLine()]) if kinds[position] > ours else []  # and opens its section, or not
        body[position] = body[position].with_changes(leading_lines=[*blank, *comments])
    elif not kinds and position < len(body):  # the only import: the code after it gets its blank lines
        body[position] = _after_imports(body[position])
    body.insert(position, statement)
    return module.with_changes(body=body)


def _split(lines) -> tuple[list, list]:
    lines = list(lines)
    blank = next((index for index, line in enumerate(lines) if line.comment is not None), len(lines))
    return lines[:blank], lines[blank:]


def _after_imports(statement: cst.BaseStatement) -> cst.BaseStatement:
    """The statement after the import block, with the blank lines ruff wants there (two before a def)."""
    _, rest = _split(statement.leading_lines)
    definition = isinstance(statement, cst.FunctionDef | cst.ClassDef)
    return statement.with_changes(leading_lines=[cst.EmptyLine()] * (2 if definition else 1) + rest)


def wrapped(statement: cst.SimpleStatementLine, line_length: int) -> cst.SimpleStatementLine:
    """A ``from x import a, b`` line longer than ``line_length``, one name per line (else as it is)."""
    node = statement.body[0]
    text = code(statement.with_changes(leading_lines=()))
    if not isinstance(node, cst.ImportFrom) or isinstance(node.names, cst.ImportStar) or "\n" in text.rstrip("\n") \
            or len(text.rstrip("\r\n")) <= line_length:
        return statement
    source = "." * len(node.relative) + (dotted(node.module) if node.module else "")
    comment = statement.trailing_whitespace.comment
    names = "".join(f"    {code(alias.with_changes(comma=cst.MaybeSentinel.DEFAULT))},\n" for alias in node.names)
    opening = f"from {source} import (" + (f"  {comment.value}" if comment else "")
    return cst.parse_statement(f"{opening}\n{names})\n").with_changes(leading_lines=statement.leading_lines)


def new_import(module: str, names: list[str], aliases: dict[str, str], line_length: int) -> cst.SimpleStatementLine:
    """``from module import names`` (sorted, with their ``as`` aliases), wrapped at ``line_length``."""
    imported = ", ".join(f"{name} as {aliases[name]}" if name in aliases else name
                         for name in sorted(names, key=member_order))
    return wrapped(cst.parse_statement(f"from {module} import {imported}\n"), line_length)
