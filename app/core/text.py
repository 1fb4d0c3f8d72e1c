"""Text that users write, bounded when stored and made safe when shown.

Names, commands and environments are other users' text on a shared box: each has a
documented maximum size (refused with the limit named), and a terminal shows them with
their control characters escaped, so that a name cannot clear, retitle or rewrite a
colleague's screen, nor reverse the text after it.
"""

from __future__ import annotations

import unicodedata

# The longest name a job may have (characters); longer ones are refused.
MAX_NAME_CHARS = 256
# The longest path-like value (workdir, venv, conda env, preflight, origin), in bytes:
# Linux's PATH_MAX.
MAX_PATH_BYTES = 4096
# A job's environment: at most this many variables, this many bytes in all.
MAX_ENV_VARS = 1024
MAX_ENV_BYTES = 64 * 1024


def printable(text: str) -> str:
    """`text` with every control or format character (C0, DEL, C1, bidirectional
    overrides, zero-width) written as its escape, e.g. ESC as \\x1b and a newline as \\n."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == " " else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    if ch == "\n":
        return "\\n"
    if ch == "\t":
        return "\\t"
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def has_control(text: str) -> bool:
    """Whether the text holds a control or format character (Unicode categories Cc, Cf)."""
    return any(unicodedata.category(ch) in ("Cc", "Cf") for ch in text)
