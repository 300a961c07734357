"""The card list: ``devices: "0,1,2,3"`` (what ASCEND_RT_VISIBLE_DEVICES gets), read in one place."""

from __future__ import annotations


def parse_cards(devices: str | None) -> list[int]:
    """The host's card ids in ``devices`` (a schema-checked "0,1,..." string); none given: []."""
    return [int(d) for d in str(devices).split(",")] if devices else []
