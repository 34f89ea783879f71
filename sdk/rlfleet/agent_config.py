"""The one validator of a run's ``config`` (hyperparameter overrides), used on both sides of the
agents/SDK seam so the messages match: the SDK checks against the schema shipped in
``rlfleet/data/agents.json`` (through a pydantic model built from it, :func:`model_from_schema`),
the runtime (``rlfleet_agents.registry``) against its live pydantic model. Each message names
``config.<key>`` and what is allowed.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from rlfleet.agent_catalog import Schema, config_schema


def validate_agent_config(agent: str, config: Any) -> None:
    """Check ``config`` against the shipped schema of ``agent``; raise ValueError naming the key."""
    schema = config_schema(agent)
    check_config(agent, config, schema, None if schema is None else _shipped_model(agent))


def check_config(agent: str, config: Any, schema: Schema | None, model: type[BaseModel] | None) -> None:
    """Validate hyperparameter overrides with ``model``; describe the first bad key from ``schema``.

    ``schema`` None means the agent takes no config. Raises ValueError naming ``config.<key>``.
    """
    if schema is None or model is None:
        if config:
            raise ValueError(f"config: the {agent!r} agent takes no config")
        return
    if not isinstance(config, Mapping):
        raise ValueError(f"config: must be a mapping of hyperparameters, got {type(config).__name__}")
    props: dict[str, Schema] = schema["properties"]
    for key in config:
        if key not in props:
            hint = difflib.get_close_matches(str(key), list(props), n=1)
            did = f"did you mean '{hint[0]}'? " if hint else ""
            raise ValueError(f"config.{key}: unknown {agent} hyperparameter; {did}(allowed: {', '.join(props)})")
    try:
        model.model_validate(dict(config))
    except ValidationError as err:
        bad = {e["loc"][0] for e in err.errors() if e["loc"]}
        key = next(k for k in config if k in bad)
        raise ValueError(f"config.{key}: {describe_problem(props[key], config[key])}") from None


# -- messages ------------------------------------------------------------------------------------

_KIND = {"integer": "an integer", "number": "a number", "boolean": "true or false", "string": "a string",
         "array": "a list"}


def _fits(json_type: str, value: Any) -> bool:
    if json_type == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    types: dict[str, type | tuple[type, ...]] = {"integer": int, "number": (int, float), "string": str, "array": list}
    return isinstance(value, types[json_type])


def _bounds(prop: Schema) -> str:
    lo = prop.get("minimum", prop.get("exclusiveMinimum"))
    hi = prop.get("maximum", prop.get("exclusiveMaximum"))
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    if lo is not None:
        return f"{'>=' if 'minimum' in prop else '>'} {lo}"
    return f"{'<=' if 'maximum' in prop else '<'} {hi}"


def describe_problem(prop: Schema, value: Any) -> str:
    """What a value for the field ``prop`` (a JSON schema property) must be, and what it was."""
    base = next(p for p in prop.get("anyOf", [prop]) if p.get("type") != "null")
    got = "null" if value is None else repr(value)
    if "enum" in base and isinstance(value, str):
        return f"{value!r} is not allowed (allowed: {', '.join(map(str, base['enum']))})"
    if base["type"] == "array":
        item = base["items"]
        return (f"must be a list of {base.get('minItems', 0)}-{base.get('maxItems', 'any')} "
                f"{_KIND[item['type']][3:]}s {_bounds(item)}, got {got}")
    if value is None or not _fits(base["type"], value):
        return f"must be {_KIND[base['type']]}, got {got}"
    return f"must be {_bounds(base)}, got {got}"


# -- a pydantic model from a shipped schema --------------------------------------------------------

_KNOWN = {"type", "enum", "anyOf", "items", "minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum",
          "exclusiveMaximum", "default", "description", "title"}
_PY = {"integer": int, "number": float, "boolean": bool, "string": str}
_CONSTRAINTS = {"minimum": "ge", "maximum": "le", "exclusiveMinimum": "gt", "exclusiveMaximum": "lt",
                "minItems": "min_length", "maxItems": "max_length"}


def _annotation(name: str, prop: Schema) -> Any:
    unknown = set(prop) - _KNOWN
    if unknown:
        raise TypeError(f"agents.json: config field {name!r} uses schema keywords rlfleet.agent_config does not "
                        f"translate: {', '.join(sorted(unknown))}; teach _annotation() or simplify the field")
    if "anyOf" in prop:
        (inner,) = [p for p in prop["anyOf"] if p.get("type") != "null"]
        return _annotation(name, inner) | None
    # Literal and list are subscripted with values read at runtime (hence Any for mypy)
    literal: Any = Literal
    if "enum" in prop:
        return literal[tuple(prop["enum"])]
    array: Any = list
    tp: Any = array[_annotation(name, prop["items"])] if prop["type"] == "array" else _PY[prop["type"]]
    limits = {kw: prop[key] for key, kw in _CONSTRAINTS.items() if key in prop}
    return Annotated[tp, Field(**limits)] if limits else tp


def model_from_schema(schema: Schema) -> type[BaseModel]:
    """A strict pydantic model equivalent to a config model's JSON schema (the subset our models use)."""
    fields: dict[str, Any] = {
        name: (_annotation(name, prop), prop.get("default")) for name, prop in schema["properties"].items()
    }
    return create_model(schema.get("title", "AgentConfig"),
                        __config__=ConfigDict(extra="forbid", strict=True), **fields)


@cache
def _shipped_model(agent: str) -> type[BaseModel]:
    schema = config_schema(agent)
    assert schema is not None
    return model_from_schema(schema)
