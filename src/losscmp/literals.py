"""Python literals in text a user gave: factory arguments in a reference, keyword
parameters in a spec.  Parsed with :mod:`ast`, never ``eval``, and refused with a plain
error when they are not literals of sane size and depth.
"""
from __future__ import annotations

import ast
from typing import Any

# What ast.parse / ast.literal_eval raise on text that is not a literal of sane size: a
# syntax error, a non-literal (ValueError), an unhashable dict key (TypeError), nesting
# deeper than the parser or the evaluator goes (RecursionError, MemoryError).
LITERAL_ERRORS = (SyntaxError, ValueError, TypeError, RecursionError, MemoryError)


def literal(node_or_text: Any) -> Any:
    """``ast.literal_eval`` that also refuses what Python could not print back: an integer
    too long for ``repr`` (a hex literal of 5,000 digits parses, then every message that
    shows it fails).  Raises one of :data:`LITERAL_ERRORS`."""
    value = ast.literal_eval(node_or_text)
    repr(value)  # ValueError past sys.get_int_max_str_digits(); RecursionError on deep nesting
    return value
