"""One-line YAML error messages (PyYAML's own span several lines and draw a caret)."""

from __future__ import annotations

import yaml


def yaml_problem(err: yaml.YAMLError) -> str:
    """``"<problem> (line L, column C)"`` from a PyYAML error, on one line."""
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    context = getattr(err, "context", None)
    mark = getattr(err, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    text = f"{context}: {problem}" if context else str(problem)
    return " ".join(text.split()) + where
