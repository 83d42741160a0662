"""JSON Schema -> llama.cpp grammar (GBNF), for replies that must parse and validate.

Every string the grammar allows is JSON that validates against the schema. Where a keyword
cannot be expressed exactly, the grammar allows a subset that still validates (declared
properties only, integers for a bounded `number`), and keywords it cannot honour at all
(`pattern`, `uniqueItems`, `not`, ...) are refused with a SchemaError rather than
silently ignored. Whitespace is bounded (a space, or a newline and some indentation) and
numbers have at most 16 digits, so a sampler cannot ramble inside a value forever.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_RULES = 4000
MAX_DEPTH = 48

# Keywords that only annotate (they do not constrain what validates).
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment",
                "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "format",
                "contentMediaType", "contentEncoding", "strict", "name"}
_HANDLED = {"type", "enum", "const", "properties", "required", "additionalProperties",
            "items", "prefixItems", "minItems", "maxItems", "minLength", "maxLength",
            "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "anyOf", "oneOf",
            "allOf", "$ref", "nullable"}

_BASE = {
    "ws": '( " " | "\\n" [ ]{0,16} )?',
    "char": '[^"\\\\\\x00-\\x1F\\x7F] | "\\\\" ( ["\\\\/bfnrt] | "u" [0-9a-fA-F]{4} )',
    "string": '"\\"" char* "\\""',
    "digits": "[0-9]{1,16}",
    "uint": '"0" | [1-9] [0-9]{0,15}',
    "integer": '"-"? uint',
    "number": '"-"? uint ( "." digits )? ( [eE] [-+]? [0-9]{1,2} )?',  # 1e999 is inf
    "boolean": '"true" | "false"',
    "null": '"null"',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" ws ( string ":" ws value ( "," ws string ":" ws value )* )? ws "}"',
    "array": '"[" ws ( value ( "," ws value )* )? ws "]"',
}
_HH = '( [01] [0-9] | "2" [0-3] )'
_FORMATS = {
    "date": '"\\"" [0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" '
            '( "0" [1-9] | [12] [0-9] | "3" [01] ) "\\""',
    "time": f'"\\"" {_HH} ":" [0-5] [0-9] ":" [0-5] [0-9] '
            f'( "Z" | [+-] {_HH} ":" [0-5] [0-9] ) "\\""',
    "uuid": '"\\"" [0-9a-f]{8} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{4} '
            '"-" [0-9a-f]{12} "\\""',
}


class SchemaError(ValueError):
    """A schema the grammar cannot enforce; the message names the place and the reason."""


def literal(text: str) -> str:
    """A GBNF literal matching exactly `text`."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _json_literal(value: Any) -> str:
    return literal(json.dumps(value, ensure_ascii=False))


def _digit_range(lo: str, hi: str) -> str:
    """GBNF for the decimal strings of equal length from `lo` to `hi` (lo <= hi)."""
    if lo == hi:
        return literal(lo)
    if len(lo) == 1:
        return f"[{lo}-{hi}]"
    n = len(lo) - 1
    if lo[1:] == "0" * n and hi[1:] == "9" * n:  # every tail: keep the grammar small
        return f"[{lo[0]}-{hi[0]}] [0-9]{{{n}}}"
    if lo[0] == hi[0]:
        return f"{literal(lo[0])} ( {_digit_range(lo[1:], hi[1:])} )"
    parts = [f"{literal(lo[0])} ( {_digit_range(lo[1:], '9' * n)} )"]
    if int(lo[0]) + 1 <= int(hi[0]) - 1:
        parts.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}] [0-9]{{{n}}}")
    parts.append(f"{literal(hi[0])} ( {_digit_range('0' * n, hi[1:])} )")
    return " | ".join(parts)


def _natural_range(lo: int, hi: int | None) -> str:
    """GBNF for the naturals lo..hi (hi None: no upper bound, up to 16 digits)."""
    parts = []
    length = len(str(lo))
    top = 16 if hi is None else len(str(hi))
    for n in range(length, top + 1):
        a = max(lo, 10 ** (n - 1) if n > 1 else 0)
        b = 10 ** n - 1 if hi is None or n < len(str(hi)) else hi
        if a <= b:
            parts.append(_digit_range(str(a), str(b)))
    return " | ".join(f"( {p} )" for p in parts)


def integer_range(lo: int | None, hi: int | None) -> str:
    """GBNF for the integers lo..hi (either side may be open)."""
    parts = []
    if hi is None or hi >= 0:
        parts.append(_natural_range(max(lo, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:
        neg_lo = 1 if hi is None or hi >= 0 else -hi
        parts.append(f'"-" ( {_natural_range(neg_lo, None if lo is None else -lo)} )')
    return " | ".join(f"( {p} )" for p in parts)


class GrammarBuilder:
    """Collects GBNF rules; `schema()` adds the rules of one JSON schema. Several schemas
    (one per tool) can go into one grammar."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self.base: set[str] = set()
        self.refs: dict[tuple[int, str], str] = {}
        self._root: Any = {}

    def schema(self, schema: Any, name: str) -> str:
        """The rule (or expression) matching JSON valid against `schema`."""
        self._root = schema
        return self.visit(schema, name)

    def add(self, hint: str, body: str) -> str:
        """A rule named after `hint` (made unique) with `body`; returns its name."""
        name = re.sub(r"[^a-zA-Z0-9-]+", "-", hint).strip("-").lower() or "r"
        candidate, k = name, 0
        while candidate in self.rules or candidate in _BASE or candidate in _FORMATS \
                or candidate == "root":
            if self.rules.get(candidate) == body:
                return candidate
            k += 1
            candidate = f"{name}-{k}"
        if len(self.rules) >= MAX_RULES:
            raise SchemaError("the schema is too large to enforce")
        self.rules[candidate] = body
        return candidate

    def use(self, name: str) -> str:
        """A base rule, pulled in with what it depends on."""
        if name not in self.base:
            self.base.add(name)
            for dep in re.findall(r"[a-z]+", _BASE.get(name, "") + _FORMATS.get(name, "")):
                if dep in _BASE and dep != name:
                    self.use(dep)
        return name

    def text(self, root: str) -> str:
        """The whole grammar, `root ::= root`."""
        lines = [f"root ::= {root}"]
        lines += [f"{name} ::= {body}" for name, body in self.rules.items()]
        lines += [f"{name} ::= {_BASE.get(name) or _FORMATS[name]}" for name in sorted(self.base)]
        return "\n".join(lines) + "\n"

    def visit(self, schema: Any, path: str, depth: int = 0) -> str:
        if depth > MAX_DEPTH:
            raise SchemaError(f"{path}: the schema nests too deeply")
        if schema is True or schema == {}:
            return self.use("value")
        if not isinstance(schema, dict):
            raise SchemaError(f"{path}: a schema must be an object")
        unknown = set(schema) - _ANNOTATIONS - _HANDLED
        if unknown:
            raise SchemaError(f"{path}: JSON schema keyword {sorted(unknown)[0]!r} cannot be "
                              "enforced")
        if "$ref" in schema:
            return self._ref(schema["$ref"], path, depth)
        if schema.get("nullable"):
            inner = {k: v for k, v in schema.items() if k != "nullable"}
            return f"( {self.visit(inner, path, depth + 1)} | {self.use('null')} )"
        for key in ("anyOf", "oneOf"):
            if key in schema:
                rest = {k: v for k, v in schema.items() if k != key}
                alts = [self.visit(_merge(rest, s, path), f"{path}/{key}/{i}", depth + 1)
                        for i, s in enumerate(schema[key])]
                return self.add(path, " | ".join(alts))
        if "allOf" in schema:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for sub in schema["allOf"]:
                merged = _merge(merged, self._deref(sub, path), path)
            return self.visit(merged, path, depth + 1)
        if "const" in schema:
            return _json_literal(schema["const"])
        if "enum" in schema:
            if not schema["enum"]:
                raise SchemaError(f"{path}: enum is empty")
            return self.add(path, " | ".join(_json_literal(v) for v in schema["enum"]))
        kind = schema.get("type")
        if isinstance(kind, list):
            alts = [self.visit({**schema, "type": t}, path, depth + 1) for t in kind]
            return self.add(path, " | ".join(alts))
        return self._typed(kind, schema, path, depth)

    def _typed(self, kind: Any, schema: dict[str, Any], path: str, depth: int) -> str:
        if kind is None:
            kind = ("object" if "properties" in schema else
                    "array" if "items" in schema or "prefixItems" in schema else None)
        if kind is None:
            return self.use("value")
        if kind == "object":
            return self._object(schema, path, depth)
        if kind == "array":
            return self._array(schema, path, depth)
        if kind == "string":
            return self._string(schema, path)
        if kind in ("integer", "number"):
            return self._number(kind, schema, path)
        if kind in ("boolean", "null"):
            return self.use(kind)
        raise SchemaError(f"{path}: unknown type {kind!r}")

    def _deref(self, schema: Any, path: str) -> Any:
        if isinstance(schema, dict) and "$ref" in schema:
            return self._target(schema["$ref"], path)
        return schema

    def _target(self, ref: Any, path: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise SchemaError(f"{path}: only local references (#/...) are supported")
        node: Any = self._root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                raise SchemaError(f"{path}: reference {ref} points nowhere")
            node = node[part]
        return node

    def _ref(self, ref: Any, path: str, depth: int) -> str:
        key = (id(self._root), str(ref))
        if key not in self.refs:
            # Reserve the name first: a recursive schema refers to itself.
            name = self.add(f"{path}-ref-{str(ref).rsplit('/', 1)[-1]}", f"<reserved {ref}>")
            self.refs[key] = name
            self.rules[name] = self.visit(self._target(ref, path), name, depth + 1)
        return self.refs[key]

    def _object(self, schema: dict[str, Any], path: str, depth: int) -> str:
        props = dict(schema.get("properties") or {})
        required = list(schema.get("required") or [])
        for key in required:
            props.setdefault(key, {})  # required but undeclared: any value
        extra = schema.get("additionalProperties")
        self.use("ws")
        if not props:
            if isinstance(extra, dict) and extra:
                value = self.visit(extra, f"{path}-additional", depth + 1)
                kv = f'{self.use("string")} ":" ws {value}'
                return self.add(path, f'"{{" ws ( {kv} ( "," ws {kv} )* )? ws "}}"')
            if extra is False:
                return self.add(path, '"{" ws "}"')
            return self.use("object")
        # Declared properties only, in their declared order: valid whatever
        # additionalProperties says. rest_i: properties i.. after one already written;
        # first_i: properties i.. with none written yet.
        rest: str | None = None
        first: str | None = None
        for key, sub in reversed(list(props.items())):
            kv = f'{_json_literal(key)} ":" ws {self.visit(sub, f"{path}-{key}", depth + 1)}'
            after = f" {rest}" if rest else ""
            if key in required:
                first = self.add(f"{path}-from-{key}", f"{kv}{after}")
            elif first is None:
                first = self.add(f"{path}-from-{key}", f"( {kv}{after} )?")
            else:
                first = self.add(f"{path}-from-{key}", f"{kv}{after} | {first}")
            step = f'"," ws {kv}'
            rest = self.add(f"{path}-after-{key}",
                            f"{step}{after}" if key in required else f"( {step} )?{after}")
        return self.add(path, f'"{{" ws {first} ws "}}"')

    def _array(self, schema: dict[str, Any], path: str, depth: int) -> str:
        self.use("ws")
        lo, hi = int(schema.get("minItems", 0)), schema.get("maxItems")
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list):
            rules = [self.visit(s, f"{path}/prefixItems/{i}", depth + 1)
                     for i, s in enumerate(prefix)]
            if len(rules) < lo or (hi is not None and len(rules) > hi):
                raise SchemaError(f"{path}: prefixItems and minItems/maxItems disagree")
            return self.add(path, '"[" ws ' + ' "," ws '.join(rules) + ' ws "]"')
        item = self.visit(schema.get("items", {}), f"{path}/items", depth + 1)
        if hi is not None and int(hi) < lo:
            raise SchemaError(f"{path}: maxItems is below minItems")
        if hi == 0:
            return self.add(path, '"[" ws "]"')
        more = f'( "," ws {item} )'
        if lo == 0:
            bound = "*" if hi is None else f"{{0,{int(hi) - 1}}}"
            return self.add(path, f'"[" ws ( {item} {more}{bound} )? ws "]"')
        body = f'"[" ws {item}'
        if lo > 1:
            body += f" {more}{{{lo - 1}}}"
        if hi is None:
            body += f" {more}*"
        elif int(hi) > lo:
            body += f" {more}{{0,{int(hi) - lo}}}"
        return self.add(path, body + ' ws "]"')

    def _string(self, schema: dict[str, Any], path: str) -> str:
        fmt = schema.get("format")
        if fmt in _FORMATS and "minLength" not in schema and "maxLength" not in schema:
            return self.add(f"format-{fmt}", _FORMATS[fmt])
        if "minLength" in schema or "maxLength" in schema:
            lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
            reps = f"{{{lo},{'' if hi is None else int(hi)}}}"
            return self.add(path, f'"\\"" {self.use("char")}{reps} "\\""')
        return self.use("string")

    def _number(self, kind: str, schema: dict[str, Any], path: str) -> str:
        keys = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
        if not any(k in schema for k in keys):
            return self.use(kind)
        lo, hi = -math.inf, math.inf
        if "minimum" in schema:
            lo = math.ceil(schema["minimum"])
        if "exclusiveMinimum" in schema:
            lo = max(lo, math.floor(schema["exclusiveMinimum"]) + 1)
        if "maximum" in schema:
            hi = math.floor(schema["maximum"])
        if "exclusiveMaximum" in schema:
            hi = min(hi, math.ceil(schema["exclusiveMaximum"]) - 1)
        if lo > hi:
            raise SchemaError(f"{path}: no {'integer' if kind == 'integer' else 'whole number'}"
                              " lies within minimum/maximum")
        return self.add(path, integer_range(None if lo == -math.inf else int(lo),
                                            None if hi == math.inf else int(hi)))


def _merge(base: dict[str, Any], sub: Any, path: str) -> dict[str, Any]:
    """`base` and `sub` as one schema (for allOf and the shared keys of anyOf)."""
    if sub is True or sub == {}:
        return dict(base)
    if not isinstance(sub, dict):
        raise SchemaError(f"{path}: a schema must be an object")
    merged = dict(base)
    for key, value in sub.items():
        if key == "properties":
            merged["properties"] = {**merged.get("properties", {}), **value}
        elif key == "required":
            merged["required"] = [*merged.get("required", []), *value]
        elif key in merged and merged[key] != value and key not in _ANNOTATIONS:
            raise SchemaError(f"{path}: allOf combines two different {key!r}")
        else:
            merged[key] = value
    return merged


def json_schema_grammar(schema: Any) -> str:
    """A complete GBNF grammar (root rule `root`) for JSON valid against `schema`."""
    builder = GrammarBuilder()
    return builder.text(builder.schema(schema, "schema"))
