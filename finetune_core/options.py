"""What a setting is, for people and for checks: help, form label, choices, range.

Every RunConfig field carries an Option in its dataclass metadata (`setting(...)` makes the
field); the CLI's --help, the New run form's labels and help icons, and validation read it
from there, so each is written once. Strategies declare their own options the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_core.util.names import nearest


@dataclass(frozen=True)
class Option:
    """One setting: its default and what people and checks need to know about it."""

    name: str  # the RunConfig field, the JSON key; the CLI flag is --name-with-dashes
    default: Any
    help: str  # one sentence: what it is, its unit or its choices
    label: str = ""  # the form's label; "" for fields the form does not show as such
    # the values it takes, or a function giving them (a registry that can grow)
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    # inclusive bounds for numbers: validation, the CLI and the form all read these
    min: float | None = None
    max: float | None = None
    unit: str = ""  # in range messages: "must be at least 1 epoch"
    # a message of its own for a value out of range ({value}, {min} and {max} are replaced)
    message: str = ""
    max_length: int | None = None  # for text
    step: float | None = None  # the form's +/- step for numbers
    format: str | None = None  # the form's number format, e.g. "%.4f"
    tag: str = ""  # how a run's label shows a value other than the default: "l2sp {:g}"
    flag: bool = True  # a `train` flag (group is set by the queue, not by people)

    def allowed(self) -> tuple[str, ...] | None:
        """Returns the values a setting with choices takes, None for the others."""
        if self.choices is None:
            return None
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def problem(self, value: Any) -> str | None:
        """Returns what is wrong with value for this setting, or None when it is fine."""
        choices = self.allowed()
        if choices is not None:
            if value in choices:
                return None
            listed = ", ".join(choices)
            return (
                f"unknown {self.name} {value!r}; choose one of {listed}.{nearest(value, choices)}"
            )
        if self.max_length is not None and len(str(value)) > self.max_length:
            return f"must be at most {self.max_length} characters"
        if (self.min is None and self.max is None) or (value is None and self.default is None):
            return None  # no range, or an optional number left empty
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        finite = number and math.isfinite(value)
        low = finite and self.min is not None and value < self.min
        high = finite and self.max is not None and value > self.max
        if finite and not low and not high:
            return None
        got = short(value)
        if self.message:
            return self.message.format(value=got, min=_number(self.min), max=_number(self.max))
        if low and self.min == 0:
            kind = "0 or more" if isinstance(self.default, int) else "0 or a positive number"
            return f"must be {kind}, got {got}"
        if low:
            return f"must be at least {self._amount(self.min)}, got {got}"
        if high:
            return f"must be at most {self._amount(self.max)}, got {got}"
        # not a finite number (NaN, infinity): say the whole range
        if self.max is not None and self.min is not None:
            return (
                f"must be a number from {_number(self.min)} to {self._amount(self.max)}, got {got}"
            )
        if self.min is not None:
            return f"must be a finite number of at least {self._amount(self.min)}, got {got}"
        return f"must be a finite number of at most {self._amount(self.max)}, got {got}"

    def _amount(self, bound: float) -> str:
        """Returns a bound with its unit: 1 epoch, 10000 epochs, 16 pixels."""
        plural = self.unit and bound != 1 and not self.unit.endswith("s")
        return f"{_number(bound)}{self.unit}{'s' if plural else ''}"

    def field(self) -> Any:
        """Returns the dataclass field for this option (its default, and itself as metadata)."""
        return dataclasses.field(default=self.default, metadata={"option": self})

    def tag_for(self, value: Any) -> str:
        """Returns the run-label text for value, "" at the default (or without a tag)."""
        if not self.tag or value is None or value == self.default:
            return ""
        return self.tag.format(value)


def short(value: Any, limit: int = 40) -> str:
    """Returns value as a message shows it: its text, cut to `limit` characters."""
    if isinstance(value, int) and value.bit_length() > 128:  # str() refuses > 4300 digits
        return f"a number of about {int(value.bit_length() * 0.30103)} digits"
    text = str(value) if isinstance(value, (int, float)) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(x: float | None) -> str:
    """Returns a bound as people write it: 4294967295 (not 4.29497e+09), 0.9, 1e-07."""
    if x is None:
        return ""
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:g}"


def setting(default: Any, help: str, **meta: Any) -> Any:
    """Returns a dataclass field whose metadata is Option(name, default, help, ...); the
    name is filled in by `options_of` from the field it is assigned to."""
    return Option("", default, help, **meta).field()


def options_of(cls) -> dict[str, Option]:
    """Returns {field name: Option} of a dataclass whose fields carry Options, in order."""
    found = {}
    for f in dataclasses.fields(cls):
        option = f.metadata.get("option")
        if option is None:
            raise TypeError(f"{cls.__name__}.{f.name} has no Option in its metadata")
        found[f.name] = (
            option if option.name == f.name else dataclasses.replace(option, name=f.name)
        )
    return found
