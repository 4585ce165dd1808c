"""The sampling keywords of ``Llama.chat``/``complete``: one table, used by ``Llama`` (which keywords
it takes), the server (how it checks them) and the CLI.

Each name is llama-server's (and, where OpenAI has it, OpenAI's) and maps onto ``pyllama.Sampler``'s
keyword of the same name. Its entry is ``(kind, low, high)``: ``kind`` is "number", "integer" or
"strings"; ``low``/``high`` bound the value (None: unbounded).
"""

from __future__ import annotations

SAMPLING: dict[str, tuple[str, float | None, float | None]] = {
    "temperature": ("number", 0, None),
    "top_p": ("number", 0, 1),
    "top_k": ("integer", 0, None),
    "min_p": ("number", 0, 1),
    "typical_p": ("number", 0, 1),
    "repeat_penalty": ("number", 0, None),
    "presence_penalty": ("number", -2, 2),
    "frequency_penalty": ("number", -2, 2),
    "penalty_last_n": ("integer", -1, None),
    "mirostat": ("integer", 0, 2),
    "mirostat_tau": ("number", 0, None),
    "mirostat_eta": ("number", 0, None),
    "dry_multiplier": ("number", 0, None),
    "dry_base": ("number", 0, None),
    "dry_allowed_length": ("integer", 0, None),
    "dry_penalty_last_n": ("integer", -1, None),
    "dry_sequence_breakers": ("strings", None, None),
    "xtc_probability": ("number", 0, 1),
    "xtc_threshold": ("number", 0, None),
    "top_n_sigma": ("number", None, None),
    "dynatemp_range": ("number", 0, None),
    "dynatemp_exponent": ("number", 0, None),
    "samplers": ("strings", None, None),
}

__all__ = ["SAMPLING"]
