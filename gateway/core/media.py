"""Media types as the gateway reads them."""

from __future__ import annotations


def is_json_media(ctype: str) -> bool:
    """A JSON media type: application/json or any +json, parameters and case ignored."""
    media = ctype.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")
