"""Bundled data files (calibration, preemption rates, managed prices, GPU specs) read as typed models.

These files are edited by hand whenever a figure is re-measured or a price changes. A typo there
must stop the program with one line naming the file and the field, not surface later as a
KeyError or a wrong estimate deep inside the planner.
"""
from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, PlainValidator, TypeAdapter, ValidationError

from contract.errors import UserError

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


class DataFileError(UserError):
    """A bundled data file is unreadable or does not match its schema."""


class DataModel(BaseModel):
    """One table of a data file. Unknown keys are errors: a misspelt key would otherwise be
    ignored and its figure silently replaced by a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _number_check(*, positive: bool, as_float: bool):
    def check(value: Any):
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1.236e9, without a dot-and-sign exponent, as a string.
            try:
                value = float(value)
            except ValueError:
                raise ValueError("must be a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError("must be a number")
        if value < 0 or (positive and value == 0):
            raise ValueError("must be above 0" if positive else "must not be negative")
        return float(value) if as_float else value
    return check


# Figures are kept as written (an int stays an int) where the old dict-based code kept them raw, so
# estimates and the assumptions stored with them stay bit-for-bit what they were; `Real` figures
# were always converted to float.
Number = Annotated[Union[int, float], PlainValidator(_number_check(positive=False, as_float=False))]
PositiveNumber = Annotated[Union[int, float], PlainValidator(_number_check(positive=True, as_float=False))]
Real = Annotated[float, PlainValidator(_number_check(positive=False, as_float=True))]
PositiveReal = Annotated[float, PlainValidator(_number_check(positive=True, as_float=True))]


def _money(value: Any) -> Decimal:
    # Prices are written as strings so no float rounding creeps in; a YAML number is read by its text.
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
        raise ValueError("must be a price such as \"0.48\"")
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise ValueError("must be a price such as \"0.48\"") from None
    if not price.is_finite() or price < 0:
        raise ValueError("must be a price of 0 or more")
    return price


def _date_text(value: Any) -> str:
    # An unquoted YAML date (2026-03-01) arrives as a date; the data keeps it as ISO text.
    if isinstance(value, dt.date):
        return value.isoformat()
    if not isinstance(value, str):
        raise ValueError("must be a date such as 2026-03-01")
    return value


Money = Annotated[Decimal, PlainValidator(_money)]
DateText = Annotated[str, PlainValidator(_date_text)]


def display_path(path: Path) -> str:
    """The file as a reader finds it: relative to the repository when it lies inside."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _where(loc: tuple) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        # "[key]" marks a bad mapping key, which the part before it already names.
        elif part != "[key]" and not (isinstance(part, str) and part.startswith("function-")):
            text += f".{part}" if text else str(part)
    return text


# pydantic's own wording names Python classes; a data file's reader thinks in YAML.
_PLAIN_WORDS = {"model_type": "must be a mapping of fields", "dict_type": "must be a mapping",
                "model_attributes_type": "must be a mapping of fields", "list_type": "must be a list",
                "tuple_type": "must be a list"}


def _one_line(err: ValidationError, prefix: tuple) -> str:
    first = err.errors()[0]
    field = _where(prefix + tuple(first["loc"]))
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"unknown field '{field}'"
    if kind == "missing":
        return f"missing field '{field}'"
    if kind in _PLAIN_WORDS:
        return f"field '{field or 'top level'}': {_PLAIN_WORDS[kind]}"
    got = first.get("input")
    shown = repr(got) if isinstance(got, (str, int, float, bool)) or got is None else type(got).__name__
    message = f"field '{field or 'top level'}': {first['msg'].removeprefix('Value error, ')} (got {shown[:60]})"
    more = len(err.errors()) - 1
    return message + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def validate(raw: Any, schema: type[T], where: str, prefix: tuple = ()) -> T:
    """`raw` (parsed YAML) as `schema`, a model or any type pydantic knows; `where` names the file."""
    try:
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            return schema.model_validate(raw)
        return TypeAdapter(schema).validate_python(raw)
    except ValidationError as e:
        raise DataFileError(f"{where}: {_one_line(e, prefix)}") from None


def read_yaml(path: Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataFileError(f"{display_path(path)}: cannot read: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise DataFileError(f"{display_path(path)}: malformed YAML{at}: {problem}") from None


def load_data_file(path: Path, schema: type[T]) -> T:
    return validate(read_yaml(path), schema, display_path(path))
