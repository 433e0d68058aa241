"""Generators for rotated values. Every random choice comes from Python's ``secrets`` module.

Three kinds (see docs/rotation.md):

``bytes``
    ``length`` random bytes (16..1024) from ``secrets.token_bytes``, encoded ``hex``,
    ``base64`` (standard alphabet, padded) or ``urlsafe`` (URL-safe alphabet, no padding).
``password``
    ``length`` characters (12..1024) from the union of the chosen character ``classes``
    (``lower``, ``upper``, ``digits``, ``symbols``). Every class appears at least once: one
    character is drawn from each class, the rest from the union, then the positions are shuffled
    (Fisher-Yates with ``secrets.randbelow``). Each draw is one ``secrets.choice`` (uniform, no
    rejection loop), so generation always takes the same number of draws.
``supplied``
    No generator: the operator provides the value (``secretsd rotate PATH --value-stdin``).
    Scheduled rotation cannot proceed and reports so.
"""

from __future__ import annotations

import base64
import secrets
import string
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ClassName = Literal["lower", "upper", "digits", "symbols"]

#: The character classes a password generator can draw from.
CLASSES: dict[str, str] = {
    "lower": string.ascii_lowercase,
    "upper": string.ascii_uppercase,
    "digits": string.digits,
    # Printable ASCII punctuation minus quotes, backslash and backtick, which break shell and
    # config-file quoting more often than they add strength.
    "symbols": "!#$%&()*+,-./:;<=>?@[]^_{|}~",
}
DEFAULT_CLASSES: tuple[ClassName, ...] = ("lower", "upper", "digits")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BytesGenerator(_Spec):
    kind: Literal["bytes"] = "bytes"
    length: int = Field(default=32, ge=16, le=1024, description="random bytes before encoding")
    encoding: Literal["hex", "base64", "urlsafe"] = "urlsafe"

    def generate(self) -> str:
        raw = secrets.token_bytes(self.length)
        if self.encoding == "hex":
            return raw.hex()
        if self.encoding == "base64":
            return base64.b64encode(raw).decode("ascii")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class PasswordGenerator(_Spec):
    kind: Literal["password"] = "password"
    length: int = Field(default=32, ge=12, le=1024)
    classes: tuple[ClassName, ...] = DEFAULT_CLASSES

    @field_validator("classes")
    @classmethod
    def _distinct(cls, value: tuple[ClassName, ...]) -> tuple[ClassName, ...]:
        if not value:
            raise ValueError("name at least one character class")
        if len(set(value)) != len(value):
            raise ValueError("character classes must not repeat")
        return value

    def alphabet(self) -> str:
        return "".join(CLASSES[c] for c in self.classes)

    def generate(self) -> str:
        union = self.alphabet()
        chars = [secrets.choice(CLASSES[c]) for c in self.classes]
        chars += [secrets.choice(union) for _ in range(self.length - len(chars))]
        for i in range(len(chars) - 1, 0, -1):  # Fisher-Yates, so the required ones sit anywhere
            j = secrets.randbelow(i + 1)
            chars[i], chars[j] = chars[j], chars[i]
        return "".join(chars)


class SuppliedGenerator(_Spec):
    kind: Literal["supplied"] = "supplied"

    def generate(self) -> str:
        raise ValueError("a supplied value is required")


GeneratorSpec = Annotated[BytesGenerator | PasswordGenerator | SuppliedGenerator, Field(discriminator="kind")]
