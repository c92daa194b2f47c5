"""What the command line and the web UI both accept from a user, and the words both use for what CLEAR saves: one
definition, so that the two never disagree."""

from __future__ import annotations

#: Seeds are 0 to 2**63 - 1: torch takes up to 2**64 - 1, and runs add the image or stage index to them.
SEED_LIMIT = 2**63


def blank(prompt: str) -> str | None:
    """Why ``prompt`` describes no image, or ``None``: it is empty or white space alone."""
    return None if prompt.strip() else "empty: describe the image you want"


def not_utf8(text: str) -> str | None:
    """Why ``text`` cannot be a prompt, or ``None``: bytes that are not UTF-8 (a command line's, a browser's lone
    surrogate) arrive as surrogates, which the tokenizers reject with a TypeError that names none of this."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"not UTF-8 text: {text.encode('utf-8', 'backslashreplace').decode()!r}"
    return None


def attention_saving(density: float) -> str:
    """What CLEAR saves at ``density`` (its attention FLOPs over full attention's), in words; a window that covers
    the image, plus pooled keys, computes more than full attention."""
    if density >= 1:
        return f"{density - 1:.1%} more attention FLOPs than full attention (the window covers the image)"
    return f"{1 / density:.2f}x fewer attention FLOPs ({1 - density:.1%} saved)"
