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
    min: float | None = None  # inclusive bounds for numbers
    max: float | None = None
    unit: str = ""  # in range messages: "must be at least 1 epoch"
    message: str = ""  # a message of its own for a value out of range ({value} is replaced)
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
        if self.min is None and self.max is None:
            return None
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if (
            number
            and math.isfinite(value)
            and (self.min is None or value >= self.min)
            and (self.max is None or value <= self.max)
        ):
            return None
        if self.message:
            return self.message.format(value=value)
        if self.max is not None and self.min is not None:
            return f"must be between {self.min:g} and {self.max:g}{self.unit}, got {value}"
        if self.min == 0:
            kind = "0 or more" if isinstance(self.default, int) else "0 or a positive number"
            return f"must be {kind}, got {value}"
        if self.min is not None:
            return f"must be at least {self.min:g}{self.unit}, got {value}"
        return f"must be at most {self.max:g}{self.unit}, got {value}"

    def field(self) -> Any:
        """Returns the dataclass field for this option (its default, and itself as metadata)."""
        return dataclasses.field(default=self.default, metadata={"option": self})

    def tag_for(self, value: Any) -> str:
        """Returns the run-label text for value, "" at the default (or without a tag)."""
        if not self.tag or value is None or value == self.default:
            return ""
        return self.tag.format(value)


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
