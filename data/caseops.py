"""CaseOps (`lossless_caps_caseops_v1`, FRONTIER.md section 1): a lossless case transform applied to
each document before tokenising, so the tokenizer sees lowercase words plus a few case operators.

Operators (private-use code points): TITLE U+E001, ALLCAPS U+E002, CAPNEXT U+E003, ESC U+E004.
encode scans left to right:
  - a literal operator character -> ESC + the character;
  - a maximal run w of ASCII letters [A-Za-z]:
      all lowercase -> w;
      |w| >= 2 and all uppercase -> ALLCAPS + lower(w);
      w[0] uppercase, w[1:] non-empty and all lowercase -> TITLE + lower(w);
      otherwise (mixed case, a lone capital) -> TITLE if w[0] is uppercase, lower(w[0]), then each later
      letter as CAPNEXT + its lowercase when it was uppercase, else itself;
  - anything else (non-ASCII letters included) is copied.
decode is its exact inverse: TITLE and CAPNEXT capitalise the next letter, ALLCAPS the rest of the
ASCII-letter run, ESC makes the next character literal. A marker with nothing to act on (TITLE,
ALLCAPS or CAPNEXT not followed by a lowercase ASCII letter, ESC not followed by an operator) is a
CaseOpsError naming its position.

`byte_weights` gives the UTF-8 bytes of the ORIGINAL text each character of an encoded text stands
for (the basis of the byte sidecar): operators 0, an ESC'd literal operator 3 (its ESC 0), ASCII
letters 1, anything else its UTF-8 length; they sum to len(original.encode("utf-8")).
"""
import re

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
NAME = "lossless_caps_caseops_v1"

_OPERATOR_CODES = np.array([ord(op) for op in OPERATORS], dtype=np.uint32)
# A maximal ASCII-letter run holding a capital: only those change (the lookbehind makes every
# match start where a run starts, so the regex engine does not retry inside lowercase words).
_CAPITALISED_RUNS = re.compile(r"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*")
_OPERATOR_CHARS = re.compile("[" + "".join(OPERATORS) + "]")
_MARKER_NAMES = {TITLE: "TITLE", ALLCAPS: "ALLCAPS", CAPNEXT: "CAPNEXT", ESC: "ESC"}


class CaseOpsError(ValueError):
    """Text that is not the output of encode; the message names the position and what is wrong."""


def _encode_word(w: str) -> str:
    if w.islower():
        return w
    lower = w.lower()
    if len(w) >= 2 and w.isupper():
        return ALLCAPS + lower
    if w[0].isupper() and len(w) >= 2 and w[1:].islower():
        return TITLE + lower
    parts = [TITLE + lower[0] if w[0].isupper() else lower[0]]
    parts += [CAPNEXT + low if ch.isupper() else ch for ch, low in zip(w[1:], lower[1:])]
    return "".join(parts)


def encode(text: str) -> str:
    """The CaseOps form of text (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"caseops.encode takes a str, got a {type(text).__name__}")
    if _OPERATOR_CHARS.search(text):  # operators are not letters: escaping first moves no word
        text = _OPERATOR_CHARS.sub(lambda m: ESC + m.group(0), text)
    return _CAPITALISED_RUNS.sub(lambda m: _encode_word(m.group(0)), text)


def _is_lower_ascii(ch: str) -> bool:
    return "a" <= ch <= "z"


def _is_ascii_letter(ch: str) -> bool:
    return "a" <= ch <= "z" or "A" <= ch <= "Z"


def _misplaced(text: str, i: int, needs: str) -> CaseOpsError:
    following = repr(text[i + 1]) if i + 1 < len(text) else "the end of the text"
    return CaseOpsError(
        f"malformed CaseOps text at position {i}: {_MARKER_NAMES[text[i]]} (U+{ord(text[i]):04X}) is followed by "
        f"{following}, not {needs}; decode only text that caseops.encode produced"
    )


def decode(text: str) -> str:
    """The original text of a CaseOps text; CaseOpsError (one line, with the position) on a
    misplaced marker."""
    if not isinstance(text, str):
        raise TypeError(f"caseops.decode takes a str, got a {type(text).__name__}")
    if not _OPERATOR_CHARS.search(text):
        return text
    out, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch == ESC:
            if i + 1 >= n or text[i + 1] not in _MARKER_NAMES:
                raise _misplaced(text, i, "an operator character to take literally")
            out.append(text[i + 1])
            i += 2
        elif ch == TITLE or ch == CAPNEXT:
            if i + 1 >= n or not _is_lower_ascii(text[i + 1]):
                raise _misplaced(text, i, "a lowercase ASCII letter")
            out.append(text[i + 1].upper())
            i += 2
        elif ch == ALLCAPS:
            if i + 1 >= n or not _is_lower_ascii(text[i + 1]):
                raise _misplaced(text, i, "a lowercase ASCII letter")
            j = i + 1
            while j < n and _is_ascii_letter(text[j]):
                j += 1
            out.append(text[i + 1:j].upper())
            i = j
        else:
            j = i + 1  # copy up to the next operator in one slice
            match = _OPERATOR_CHARS.search(text, j)
            j = match.start() if match else n
            out.append(text[i:j])
            i = j
    return "".join(out)


def byte_weights(encoded: str) -> np.ndarray:
    """int32 [len(encoded)]: the UTF-8 bytes of the original text each character of `encoded`
    stands for (operators 0, an ESC'd literal operator 3 and its ESC 0, ASCII letters 1, others
    their UTF-8 length). Sums to the UTF-8 length of decode(encoded)."""
    codes = np.frombuffer(encoded.encode("utf-32-le"), dtype=np.uint32)
    weights = (1 + (codes >= 0x80).astype(np.int32) + (codes >= 0x800) + (codes >= 0x10000)).astype(np.int32)
    operators = np.flatnonzero(np.isin(codes, _OPERATOR_CODES))
    literal_next = -1  # index of the character the last ESC made literal
    for i in operators.tolist():
        if i == literal_next:
            continue  # a literal operator keeps its UTF-8 length (3)
        weights[i] = 0
        if codes[i] == ord(ESC):
            literal_next = i + 1
    return weights
