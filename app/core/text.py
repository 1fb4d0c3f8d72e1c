"""Text that users write, bounded when stored and made safe when shown.

Names, commands and environments are other users' text on a shared box: each has a
documented maximum size (refused with the limit named), and a terminal shows them with
their control characters escaped, so that a name cannot clear, retitle or rewrite a
colleague's screen, nor reverse the text after it.
"""

from __future__ import annotations

import re

# The longest name a job may have (characters); longer ones are refused.
MAX_NAME_CHARS = 256
# The longest path-like value (workdir, venv, conda env, preflight, origin), in characters:
# Linux's PATH_MAX.
MAX_PATH_CHARS = 4096
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


# What a name may not hold: the C0 and C1 controls and DEL (a newline, an escape sequence),
# and the invisible format characters that reorder or hide text (zero-width, bidirectional
# marks and overrides, the byte-order mark). One character class, so that the check here and
# the dashboard's published schema (a pattern) say the same.
CONTROL_CLASS = ("\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069"
                 "\ufeff")
_CONTROL = re.compile(f"[{CONTROL_CLASS}]")
# The same class spelled with the characters themselves: a pattern every regex engine
# reads alike (pydantic's, and the JSON Schema generator's).
NAME_PATTERN = "^[^" + re.sub(
    r"\\[xu]([0-9a-f]{2,4})", lambda m: chr(int(m.group(1), 16)), CONTROL_CLASS) + "]*$"


def has_control(text: str) -> bool:
    """Whether the text holds a control or an invisible format character."""
    return _CONTROL.search(text) is not None


# A plain name (a user's, a project's): printed in lists and matched against limits and
# owners as it is, so short and login-like.
MAX_PLAIN_CHARS = 64
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def plain_name_problem(what: str, value: str) -> str | None:
    """What is wrong with `value` as a plain name of a `what` (e.g. "user name"), or None."""
    if len(value) > MAX_PLAIN_CHARS or not PLAIN_NAME.fullmatch(value):
        return (f"bad {what} {value[:MAX_PLAIN_CHARS]!r}: up to {MAX_PLAIN_CHARS} letters, "
                "digits, '.', '_' or '-', starting with a letter or digit")
    return None
