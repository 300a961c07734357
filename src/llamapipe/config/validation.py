"""config.yaml (with ``--configfile`` and ``--config``) against workflow/schemas/config.schema.yaml.

Three steps, in the order common.smk runs them:

- ``coerce``: Snakemake hands nested ``--config`` values over as strings (YAML's BaseLoader):
  ``--config 'npu={sft: {max_steps: 500}}'`` gives ``"500"``. Each string is read as the schema
  wants it at its place, at every depth (``$ref``, ``allOf``, ``oneOf``/``anyOf`` branches, list
  items): ints, floats (``1.0e-4``, ``3e-3``), booleans, null. A string the schema accepts as a
  string stays one; a value that cannot be typed stays as given, for ``validate`` to report.
- ``validate``: jsonschema's ``iter_errors`` with the schema's defaults filled in; every error
  becomes a line that names the dotted key, the value and what would be accepted, in words.
- the npu overlays ``npu.sft`` / ``npu.export`` / ``npu.predict`` are checked key by key as the
  section they overlay (``with_overlays``), so a typo or an untyped value there is a schema error
  before any cross-field rule reads it.

Imported at Snakefile parse time: pure Python, no Paddle.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import re
from collections.abc import Iterator
from typing import Any

from llamapipe.core.errors import PipelineError

OVERLAID_SECTIONS = ("sft", "export", "predict", "data")  # npu.<section> overlays <section> on target npu

# The schema's patterns in words (tests/test_config_cli.py checks every pattern of the schema is here).
PATTERN_WORDS = {
    "^[0-9]+(,[0-9]+)*$": "card ids separated by commas, without spaces (e.g. 0,1,2,3)",
    "^[0-9a-f]{64}$": "64 lowercase hex digits (what sha256sum prints)",
    "^[0-9a-f]{32}$": "32 lowercase hex digits (what md5sum prints)",
    "^[0-9]+[bkmg]?$": "a size: a whole number with an optional unit b, k, m or g, lowercase (e.g. 2g, 128g)",
    "^[0-9a-f]{7,40}$": "a git commit: 7 to 40 lowercase hex digits",
    "^(https?://|file:).+": "an http://, https:// or file: url (file:///absolute/path or file:relative/path)",
}
TYPE_WORDS = {
    "integer": "a whole number",
    "number": "a number (e.g. 2, 0.5, 1.0e-4)",
    "boolean": "true or false",
    "null": "null",
    "string": "a string",
    "object": "a mapping ({key: value, ...})",
    "array": "a list ([a, b, ...])",
}
COMBINATORS = ("oneOf", "anyOf")


def schema_path() -> str:
    """workflow/schemas/config.schema.yaml of the checkout this package runs from."""
    return os.path.join(os.path.dirname(__file__), "..", "..", "..", "workflow", "schemas", "config.schema.yaml")


def config_schema(path: str | None = None) -> dict:
    """The config schema as validation uses it: the file, with the npu overlays spelt out."""
    import yaml

    with open(path or schema_path(), encoding="utf-8") as f:
        return with_overlays(yaml.safe_load(f))


def with_overlays(schema: dict) -> dict:
    """``npu.<section>`` holds any of ``<section>``'s keys, each checked as there, without the
    section's defaults (a default would overlay the user's value) or required keys (the
    section has them). Idempotent."""
    out = copy.deepcopy(schema)
    npu = out.get("$defs", {}).get("npu", {}).get("properties")
    if npu is None:
        return out
    for section in OVERLAID_SECTIONS:
        keys = out["properties"][section].get("properties", {})
        npu[section] = {
            "description": f"overlays the {section} section on target npu: any of its keys",
            "type": "object",
            "additionalProperties": False,
            "properties": {k: {kk: vv for kk, vv in sub.items() if kk != "default"} for k, sub in keys.items()},
        }
    return out


# --- coercion ----------------------------------------------------------------------------------


def _resolve_ref(root: dict, ref: str) -> dict:
    if not ref.startswith("#/"):
        raise PipelineError(f"config schema: only local $refs are supported (got {ref})")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _branches(schema: Any, root: dict, depth: int = 0) -> list[dict]:
    """The schemas a value at this place may satisfy: ``$ref`` followed, ``allOf`` parts and
    ``oneOf``/``anyOf`` alternatives flattened (for typing, not for validation)."""
    if not isinstance(schema, dict) or depth > 20:
        return []
    if "$ref" in schema:
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {**_resolve_ref(root, schema["$ref"]), **rest}
    found = [schema]
    for key in ("allOf", *COMBINATORS):
        for sub in schema.get(key, []):
            found += _branches(sub, root, depth + 1)
    return found


def _types(branch: dict) -> list[str]:
    t = branch.get("type", [])
    return [t] if isinstance(t, str) else list(t)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same JSON kind (``True == 1`` in Python, not in a config)."""
    kinds = {_kind(a), _kind(b)}
    return a == b and (len(kinds) == 1 or kinds == {"integer", "number"})


def _fits(value: Any, branch: dict) -> bool:
    """Whether ``value`` is of a kind (and const/enum value) this branch allows."""
    if "const" in branch and not _same(value, branch["const"]):
        return False
    if "enum" in branch and not any(_same(value, e) for e in branch["enum"]):
        return False
    types = _types(branch)
    if not types:
        return True
    kind = _kind(value)
    return kind in types or (kind == "integer" and "number" in types)


def _constrains(branch: dict) -> bool:
    return any(k in branch for k in ("type", "const", "enum"))


def _readings(text: str) -> Iterator[Any]:
    """A command-line string read as each scalar it could mean, most specific first."""
    import yaml

    try:
        yield int(text)
    except ValueError:
        pass
    try:
        yield float(text)  # "1.0e-4", "3e-3" (YAML 1.1 reads "3e-3" as a string)
    except ValueError:
        pass
    try:
        yield yaml.safe_load(text)  # true/false, null
    except yaml.YAMLError:
        pass


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)  # "nan", "inf", ".inf" are no setting


def _typed_string(text: str, branches: list[dict]) -> Any:
    allowed = [b for b in branches if _constrains(b)]
    if not allowed:
        return text
    for b in allowed:  # the schema takes it as a string here: a string it stays
        if _fits(text, b) and "string" in (_types(b) or ["string"]):
            pattern = b.get("pattern")
            if not pattern or re.search(pattern, text):
                return text
    for value in _readings(text):
        if _finite(value) and any(_fits(value, b) for b in allowed):
            return value
    return text


def coerce(value: Any, schema: dict, root: dict | None = None) -> Any:
    """``value`` with the command line's strings typed by ``schema`` at every depth (see the
    module docstring); what cannot be typed is returned as given."""
    root = schema if root is None else root
    branches = _branches(schema, root)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            sub = next((b["properties"][key] for b in branches if key in b.get("properties", {})), None)
            if sub is None:
                sub = next((b["additionalProperties"] for b in branches
                            if isinstance(b.get("additionalProperties"), dict)), None)
            out[key] = item if sub is None else coerce(item, sub, root)
        return out
    if isinstance(value, list):
        items = next((b["items"] for b in branches if isinstance(b.get("items"), dict)), None)
        return [coerce(v, items, root) for v in value] if items is not None else value
    if isinstance(value, str):
        return _typed_string(value, branches)
    if _kind(value) == "integer":
        # `--config devices=4`: Snakemake reads a top-level value as an int first
        wanted = [b for b in branches if _constrains(b)]
        if wanted and not any(_fits(value, b) for b in wanted) and any(_fits(str(value), b) for b in wanted):
            return str(value)
    return value


# --- validation and its messages ---------------------------------------------------------------


def validate(config: dict, schema: dict, defaults: bool = True) -> tuple[dict, list[str]]:
    """A copy of ``config`` with the schema's defaults filled in, and every problem, one message
    each (empty: valid). ``schema`` as ``config_schema`` returns it."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    cls = base
    if defaults:

        def set_defaults(validator, properties, instance, sub):
            if isinstance(instance, dict):
                for name, prop in properties.items():
                    if "default" in prop and name not in instance:
                        instance[name] = copy.deepcopy(prop["default"])
            yield from base.VALIDATORS["properties"](validator, properties, instance, sub)

        cls = jsonschema.validators.extend(base, {"properties": set_defaults})
    config = copy.deepcopy(config)
    problems: list[str] = []
    for error in cls(schema).iter_errors(config):
        for line in describe(error, schema):
            if line not in problems:
                problems.append(line)
    return config, problems


def checked(config: dict, schema: dict, defaults: bool = True) -> dict:
    """``validate``, raising one PipelineError that lists every problem."""
    config, problems = validate(config, schema, defaults)
    if problems:
        raise PipelineError(report(problems))
    return config


def report(problems: list[str]) -> str:
    n = len(problems)
    head = f"config: {n} problem{'s' if n > 1 else ''} (config.yaml, --configfile and --config, checked " \
           f"against workflow/schemas/config.schema.yaml):"
    return "\n".join([head, *(f"  - {p}" for p in problems)])


def dotted(path: Any) -> str:
    """``npu.parallel.tensor_parallel_degree``; list items as ``drivers[1]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def shown(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_words(types: list[str]) -> str:
    return " or ".join(TYPE_WORDS.get(t, t) for t in types)


def _accepted(schema: dict, root: dict) -> str:
    """What a key accepts, in words: its pattern's, enum's or type's."""
    b = _branches(schema, root)[0]
    if "pattern" in b:
        return PATTERN_WORDS.get(b["pattern"], f"text matching the regular expression {b['pattern']}")
    if "enum" in b:
        return "one of " + ", ".join(shown(e) for e in b["enum"])
    return _type_words(_types(b)) or "a value"


def _branch_words(branch: dict, root: dict) -> str:
    """What one alternative of a oneOf/anyOf accepts, in words."""
    b = _branches(branch, root)[0]
    if "const" in b:
        return shown(b["const"])
    if "enum" in b:
        return "one of " + ", ".join(shown(e) for e in b["enum"])
    if "properties" in b and (_types(b) in ([], ["object"])):
        return f"a mapping of {', '.join(b['properties'])}"
    return _type_words(_types(b)) or "anything"


def _schema_keys(schema: dict, root: dict, prefix: str = "", depth: int = 0) -> Iterator[str]:
    """Every dotted key the schema names."""
    if depth > 6:
        return
    for b in _branches(schema, root):
        for name, sub in b.get("properties", {}).items():
            key = f"{prefix}.{name}" if prefix else name
            yield key
            yield from _schema_keys(sub, root, key, depth + 1)


def did_you_mean(where: str, name: str, known: list[str], root: dict) -> str | None:
    """The key ``name`` (unknown in ``where``) was probably meant to be: a close spelling in the
    same place, else the same or a close name elsewhere in the schema."""
    close = difflib.get_close_matches(name, known, n=1) or \
        difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=1)
    if close:
        match = next(k for k in known if k.lower() == close[0].lower())
        return f"{where}.{match}" if where else match
    elsewhere: dict[str, str] = {}
    for k in _schema_keys(root, root):
        elsewhere.setdefault(k.rsplit(".", 1)[-1], k)  # the first, shallowest place a name is used
    close = difflib.get_close_matches(name, list(elsewhere), n=1)
    return elsewhere[close[0]] if close else None


def describe(error: Any, root: dict) -> list[str]:
    """One jsonschema error as lines a user acts on: the dotted key, the value, what is accepted."""
    key = dotted(error.absolute_path) or "(the config)"
    value, rule, want = error.instance, error.validator, error.validator_value
    if rule == "additionalProperties" and isinstance(value, dict):
        props = list(error.schema.get("properties", {}))
        patterns = list(error.schema.get("patternProperties", {}))
        where = dotted(error.absolute_path)
        lines = []
        for name in value:
            if name in props or any(re.search(p, name) for p in patterns):
                continue
            full = f"{where}.{name}" if where else name
            guess = did_you_mean(where, name, props, root)
            known = f"did you mean {guess}?" if guess else f"{where or 'the config'} holds: {', '.join(props)}"
            lines.append(f"{full}: unknown key; {known}")
        return lines
    if rule == "required" and isinstance(value, dict):
        props = error.schema.get("properties", {})
        return [f"{key + '.' if error.absolute_path else ''}{name}: required and missing; it takes "
                f"{_accepted(props.get(name, {}), root)}" for name in want if name not in value]
    if rule == "type":
        types = _types(error.schema)
        quote = f" (quote it: \"{value}\")" if "string" in types and _kind(value) in ("integer", "number") else ""
        return [f"{key} = {shown(value)}: must be {_type_words(types)}{quote}"]
    if rule == "enum":
        return [f"{key} = {shown(value)}: must be one of {', '.join(shown(e) for e in want)}"]
    if rule == "const":
        return [f"{key} = {shown(value)}: must be {shown(want)}"]
    if rule == "pattern":
        words = PATTERN_WORDS.get(want, f"text matching the regular expression {want}")
        return [f"{key} = {shown(value)}: must be {words}"]
    bounds = {"minimum": "at least", "exclusiveMinimum": "more than", "maximum": "at most",
              "exclusiveMaximum": "less than", "minItems": "a list of at least", "minLength": "at least"}
    if rule in bounds:
        unit = {"minItems": " item(s)", "minLength": " character(s)"}.get(rule, "")
        return [f"{key} = {shown(value)}: must be {bounds[rule]} {want}{unit}"]
    if rule in COMBINATORS:
        return _describe_alternatives(error, key, root)
    return [f"{key} = {shown(value)}: {error.message[:200]}"]


def _describe_alternatives(error: Any, key: str, root: dict) -> list[str]:
    """oneOf/anyOf (``npu.parallel``: auto or a mapping of degrees): the problems inside the
    alternative of the value's kind, else what the alternatives are."""
    by_branch: dict[int, list] = {}
    for sub in error.context or []:
        by_branch.setdefault(sub.relative_schema_path[0], []).append(sub)
    here = list(error.absolute_path)
    kind_fits = [errs for errs in by_branch.values()
                 if not any(list(e.absolute_path) == here and e.validator in ("type", "const", "enum") for e in errs)]
    if len(kind_fits) == 1:
        return [line for e in kind_fits[0] for line in describe(e, root)]
    if not error.context:  # valid under more than one alternative
        return [f"{key} = {shown(error.instance)}: {error.message[:200]}"]
    words = [_branch_words(b, root) for b in error.validator_value]
    return [f"{key} = {shown(error.instance)}: must be {' or '.join(words)}"]
