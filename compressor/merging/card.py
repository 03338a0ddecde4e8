"""What a model card says about a merge, from the `merge` record in compression.json.

The Hub links a merged model to its parents through the card's YAML metadata:
``base_model`` (a list of Hub ids) and ``base_model_relation: merge``. Inputs that are local
folders have no Hub id; they stay out of ``base_model`` (the Hub rejects ids that do not exist)
and are listed in the card's text from `merge_inputs`.
"""

from __future__ import annotations

from typing import Any

from compressor.card_facts import merge_hub_ids, merge_parents


def merge_inputs(compression: dict[str, Any]) -> list[dict[str, Any]]:
    """Every input of the merge as recorded, the base first."""
    return merge_parents(compression.get("merge") or {})


def merge_card_metadata(compression: dict[str, Any]) -> dict[str, Any]:
    """Card metadata for a merged model; empty when the model was not made by a merge."""
    merge = compression.get("merge")
    if not merge:
        return {}
    hub_ids = merge_hub_ids(merge)
    metadata: dict[str, Any] = {"tags": ["merge", f"merge-{merge['method']}"]}
    if hub_ids:
        metadata["base_model"] = hub_ids
        metadata["base_model_relation"] = "merge"
    return metadata
