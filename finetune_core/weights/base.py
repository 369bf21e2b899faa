"""What every weights source shares: the error it raises and the sentence naming the sources."""

from __future__ import annotations

SOURCES_HELP = (
    "builtin (offline stand-in: a backbone pretrained on the built-in source task), "
    "a local file (PATH.safetensors, .pt or .pth), run:RUN_ID (an earlier run's best weights) "
    "or none (random initialisation)"
)


class WeightsError(RuntimeError):
    """Weights cannot be had; the message says what failed and what to do."""


def first_line(e: BaseException) -> str:
    """Returns the first line of an exception's message (its type when it has none), capped."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
