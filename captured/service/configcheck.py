"""Raw configuration values checked against the declarations of the Struct tree, in one walk.

Each setting is declared once, on its field (`config`, `settings`, `datacapture`):

    max_open_files: Annotated[int, Meta(ge=1, le=4096, description="...")] = 64

`check_tree` walks the Struct types (through `msgspec.inspect`), checks each raw value from the
files and flags against its field's type and `Meta` constraints, and records every problem,
one line each, before anything is built:

    [<file>: ]<dotted.key> = <value>: <rule>

The rule's words are generated from the constraints ("must be an integer from 1 to 4096").
What `Meta` cannot say lives in the field's `Meta.extra`:

- `rule`: the rule in words, instead of generated ones (a name pattern, a KMS key);
- `notes`: words after a bound, keyed by constraint: `{"ge": "only when a file is sealed"}`;
- `binary`: bounds shown in KiB / MiB / GiB;
- `items`: what a list holds, in the plural ("content types"), for its rule;
- `parse`: `(checker, key, value, rule) -> value` replaces the type check, for values that are
  normalised (paths resolved, SDK spellings mapped) or that Meta cannot describe;
- `check`: `(checker, key, value, table) -> None` runs once the type check passed, for rules
  that involve another field of the same table;
- `default`: the default in words, for the README, where none is in the Struct.

`table_rows` renders the README's configuration table from the same declarations.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, cast

import msgspec
import msgspec.inspect as mi

from captured.service.configfile import Draft, show, toml_value, unknown_key

MISSING: Any = object()  # stands for a required key that is absent
TABLE_RULE = "must be a table (an object)"

Parse = Callable[["Checker", str, object, str], object]
Check = Callable[["Checker", str, object, Mapping[str, object]], None]


class Checker:
    """Records problems, each prefixed with the file its key came from; `host`: also check this
    host for what `serve` would fail on at start (groups, directories)."""

    def __init__(self, draft: Draft, problems: list[str], *, host: bool = False) -> None:
        self.draft = draft
        self.problems = problems
        self.host = host

    def prefix(self, key: str) -> str:
        label = self.draft.source(key).label
        return f"{label}: " if label else ""

    def bad(self, key: str, value: object, rule: str) -> None:
        prefix = self.prefix(key)
        if value is MISSING:
            self.problems.append(f"{prefix}{key}: missing, required: {rule}")
        else:
            self.problems.append(f"{prefix}{key} = {show(value)}: {rule}")

    def unknown(self, parent: str, name: str, value: object, known: list[str]) -> None:
        """Key `name` of table `parent` is none of `known`; the file that gave it is named."""
        self.problems.append(
            self.prefix(f"{parent}.{name}" if parent else name) + unknown_key(name, value, parent, known)
        )

    def base_dir(self, key: str) -> str:
        """The directory relative paths given for `key` resolve against."""
        return self.draft.source(key).base_dir


class Spec(NamedTuple):
    """One field's declaration, unwrapped: its type, whether None is allowed, its Meta extras."""

    name: str
    type: mi.Type
    optional: bool
    extra: Mapping[str, Any]
    description: str

    @property
    def rule(self) -> str:
        return cast(str, self.extra["rule"]) if "rule" in self.extra else _generated_rule(self)


def spec(name: str, t: mi.Type) -> Spec:
    optional, description = False, ""
    extra: dict[str, Any] = {}
    while isinstance(t, mi.Metadata | mi.UnionType):
        if isinstance(t, mi.Metadata):
            extra = {**(t.extra or {}), **extra}
            description = description or (t.extra_json_schema or {}).get("description", "")
            t = t.type
        else:
            rest = [x for x in t.types if not isinstance(x, mi.NoneType)]
            optional = len(rest) < len(t.types)
            if len(rest) != 1:
                raise TypeError(f"{name}: only `X | None` unions are supported")
            t = rest[0]
    return Spec(name, t, optional, extra, description)


def whole(pattern: re.Pattern[str]) -> str:
    """`pattern` for `Meta(pattern=...)`, which searches: anchored at both ends of the string."""
    return rf"\A(?:{pattern.pattern})\Z"


def fields(struct: type[msgspec.Struct]) -> tuple[mi.Field, ...]:
    info = mi.type_info(struct)
    assert isinstance(info, mi.StructType)
    return info.fields


# --- the walk --------------------------------------------------------------------------------------------


def check_tree(ck: Checker, root: type[msgspec.Struct]) -> dict[str, object]:
    """The draft's values checked against `root`'s declarations, normalised, ready for
    `msgspec.convert`; meaningful only if no problem was recorded."""
    return _table(ck, "", ck.draft.values, fields(root)) or {}


def _table(ck: Checker, key: str, value: object, declared: tuple[mi.Field, ...]) -> dict[str, object] | None:
    if not isinstance(value, dict):
        ck.bad(key, value, TABLE_RULE)
        return None
    known = [f.name for f in declared]
    for name, item in value.items():
        if name not in known:
            ck.unknown(key, name, item, known)
    out: dict[str, object] = {}
    # What `check` hooks see of the table: the values that passed, else the defaults.
    passed = {f.name: f.default for f in declared if f.default is not msgspec.NODEFAULT}
    for field in declared:
        sub = f"{key}.{field.name}" if key else field.name
        s = spec(field.name, field.type)
        raw = value.get(field.name, MISSING)
        if raw is MISSING or (raw is None and s.optional):
            if field.required:
                ck.bad(sub, MISSING, s.rule)
            elif "check" in s.extra:  # the default must agree with the other fields too
                cast(Check, s.extra["check"])(ck, sub, field.default, passed)
            continue  # the Struct's default
        before = len(ck.problems)
        out[field.name] = _value(ck, sub, raw, s, passed)
        if len(ck.problems) == before:
            passed[field.name] = out[field.name]
        else:
            passed.pop(field.name, None)
    return out


def _value(ck: Checker, key: str, raw: object, s: Spec, table: Mapping[str, object]) -> object:
    if "parse" in s.extra:
        return cast(Parse, s.extra["parse"])(ck, key, raw, s.rule)
    if isinstance(s.type, mi.StructType):
        return _table(ck, key, raw, s.type.fields)
    if isinstance(s.type, mi.VarTupleType | mi.ListType):
        return _list(ck, key, raw, s)
    if not fits(raw, s.type):
        ck.bad(key, raw, s.rule)
    elif "check" in s.extra:
        cast(Check, s.extra["check"])(ck, key, raw, table)
    return raw


def _list(ck: Checker, key: str, raw: object, s: Spec) -> object:
    assert isinstance(s.type, mi.VarTupleType | mi.ListType)
    lo, hi = s.type.min_length or 0, s.type.max_length
    if not isinstance(raw, list | tuple) or not lo <= len(raw) <= (len(raw) if hi is None else hi):
        ck.bad(key, raw, s.rule)
        return raw
    item = spec(s.name, s.type.item_type)
    if isinstance(item.type, mi.StructType) or item.extra:  # items with rules of their own
        return [_value(ck, f"{key}[{i}]", x, item, {}) for i, x in enumerate(raw)]
    if not all(fits(x, item.type) for x in raw):
        ck.bad(key, raw, s.rule)  # plain items: the list's rule says what they must be
    return raw


def fits(value: object, t: mi.Type) -> bool:
    """Whether a scalar `value` has type `t` and meets its constraints (lengths before patterns)."""
    if isinstance(t, mi.BoolType):
        return isinstance(value, bool)
    if isinstance(t, mi.StrType):
        return (
            isinstance(value, str)
            and (t.min_length or 0) <= len(value) <= (len(value) if t.max_length is None else t.max_length)
            and (t.pattern is None or re.search(t.pattern, value) is not None)
        )
    if not isinstance(t, mi.IntType | mi.FloatType) or isinstance(value, bool):
        return False
    if not isinstance(value, int if isinstance(t, mi.IntType) else int | float):
        return False  # a float for an integer; a float field takes an integer
    # Comparisons only, before any float(): a huge int would overflow; NaN fails every one.
    return (
        value == value
        and (t.ge is None or value >= t.ge)
        and (t.gt is None or value > t.gt)
        and (t.le is None or value <= t.le)
        and (t.lt is None or value < t.lt)
    )


# --- rules in words --------------------------------------------------------------------------------------


def _generated_rule(s: Spec) -> str:
    t = s.type
    if isinstance(t, mi.BoolType):
        return "must be a boolean (true or false)"
    if isinstance(t, mi.IntType):
        return "must be an integer" + _range(t, s.extra)
    if isinstance(t, mi.FloatType):
        noun = "a number of seconds" if s.name.endswith("_s") else "a number"
        return "must be " + ("a percentage" if s.name.endswith("_percent") else noun) + _range(t, s.extra)
    if isinstance(t, mi.StructType):
        return TABLE_RULE
    if isinstance(t, mi.VarTupleType | mi.ListType):
        lo, hi = t.min_length, t.max_length
        count = f"{lo} to {hi}" if lo and hi else f"at most {hi}" if hi else f"at least {lo}" if lo else ""
        item = spec(s.name, t.item_type)
        bounds = _range(item.type, item.extra) if isinstance(item.type, mi.IntType) else ""
        words = ("must be a list of", count, s.extra.get("items", "items"))
        return " ".join(w for w in words if w) + (
            f" ({bounds.strip().removeprefix('from ')})" if bounds else ""
        )
    if isinstance(t, mi.StrType):
        lo, hi = t.min_length or 0, t.max_length
        return "must be a string" + (f" of {lo} to {hi} characters" if hi is not None else "")
    raise TypeError(f"{s.name}: no rule in words for {type(t).__name__}")


#: How a range reads, by its (lower, upper) constraint kinds.
_RANGE_WORDS = {
    ("ge", "le"): "from {lo} to {hi}",
    ("ge", "lt"): "from {lo} to below {hi}",
    ("gt", "le"): "greater than {lo} and at most {hi}",
    ("gt", "lt"): "greater than {lo} and below {hi}",
    ("ge", ""): "of at least {lo}",
    ("gt", ""): "greater than {lo}",
    ("", "le"): "at most {hi}",
    ("", "lt"): "below {hi}",
}


def _range(t: mi.IntType | mi.FloatType, extra: Mapping[str, Any]) -> str:
    """` from 1 to 4096`: the bounds of `t` in words, each followed by its note, if any."""
    notes: Mapping[str, str] = extra.get("notes", {})

    def bound(kind: str, x: float | None) -> str:
        if x is None:
            return ""
        text = _binary(int(x)) if extra.get("binary") else _number(x)
        return f"{text} ({notes[kind]})" if kind in notes else text

    lo_kind = "ge" if t.ge is not None else "gt" if t.gt is not None else ""
    hi_kind = "le" if t.le is not None else "lt" if t.lt is not None else ""
    words = _RANGE_WORDS.get((lo_kind, hi_kind))
    if words is None:
        return ""
    lo, hi = (
        bound(lo_kind, t.ge if lo_kind == "ge" else t.gt),
        bound(hi_kind, t.le if hi_kind == "le" else t.lt),
    )
    return " " + words.format(lo=lo, hi=hi)


def _number(x: float) -> str:
    return str(int(x)) if isinstance(x, int) or x.is_integer() else repr(x)


def _binary(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return str(n)


# --- the README table ------------------------------------------------------------------------------------

TABLE_HEADER = ("| key | default | rule | meaning |", "| --- | --- | --- | --- |")
BLOCK_BEGIN = "<!-- configuration table: generated by `python -m captured.service.config README.md` -->"
BLOCK_END = "<!-- end of the generated configuration table -->"


def table_rows(root: type[msgspec.Struct], defaults: msgspec.Struct) -> list[str]:
    """The README's configuration table: a row per described field, in declaration order.

    A table (a Struct-typed field without a description) has no row of its own, its fields do;
    `defaults` supplies the default column where the field declares no `default` in words.
    """
    return [*TABLE_HEADER, *(_row(key, s, f, value) for key, s, f, value in _described(root, defaults, ""))]


def _described(
    struct: type[msgspec.Struct], defaults: object, prefix: str
) -> Iterator[tuple[str, Spec, mi.Field, object]]:
    for field in fields(struct):
        s = spec(field.name, field.type)
        key = prefix + field.name
        value = getattr(defaults, field.name, None)
        if s.description:
            yield key, s, field, value
        if isinstance(s.type, mi.StructType):
            yield from _described(s.type.cls, value, key + ".")


def _row(key: str, s: Spec, field: mi.Field, value: object) -> str:
    default = cast(str, s.extra.get("default", "")) or (
        "none" if value is None else f"`{toml_value(s.name, value)}`" + _size(s.name, value)
    )
    rule = s.rule.removeprefix("must be ")
    item = spec(s.name, s.type.item_type) if isinstance(s.type, mi.VarTupleType | mi.ListType) else None
    if item is not None and "rule" in item.extra:
        rule += ", each " + item.rule.removeprefix("must be ")
    if field.required and "." in key:
        rule = f"required in `[{key.rpartition('.')[0]}]`; {rule}"
    cells = (f"`{key}`", default, rule, s.description)
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _size(name: str, value: object) -> str:
    """` (64 MiB)` after a byte count that is a whole number of KiB, MiB or GiB."""
    binary = _binary(value) if name.endswith("_bytes") and isinstance(value, int) and value > 0 else ""
    return f" ({binary})" if " " in binary else ""


def replace_block(text: str, lines: list[str]) -> str:
    """`text` with the lines between `BLOCK_BEGIN` and `BLOCK_END` replaced by `lines`."""
    head, begin, rest = text.partition(BLOCK_BEGIN + "\n")
    _, end, tail = rest.partition(BLOCK_END)
    if not begin or not end:
        raise ValueError(f"no {BLOCK_BEGIN!r} ... {BLOCK_END!r} block")
    return head + begin + "\n".join(lines) + "\n" + end + tail


def block(text: str) -> list[str]:
    """The lines between `BLOCK_BEGIN` and `BLOCK_END` in `text` (empty without the markers)."""
    _, _, rest = text.partition(BLOCK_BEGIN + "\n")
    inside, end, _ = rest.partition(BLOCK_END)
    return inside.splitlines() if end else []
