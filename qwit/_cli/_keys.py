"""Telling a flow this process can't decrypt from one that is broken.

With payload encryption, each encrypted payload names the key that
encrypted it (``encryption-key-id``, in the clear). A flow whose payloads
name a key this process does not have can't be shown, and the user needs to
hear which key is missing, not that a worker failed to answer.
"""

from __future__ import annotations

from collections.abc import Iterator

import temporalio.client
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.service import RPCError

from ..temporal import (
    ENCODING,
    ENCRYPTION_KEY_FILE_ENV,
    ENCRYPTION_KEYS_ENV,
    KEY_ID_METADATA,
    QwitPlugin,
)


def _payloads(message: Message) -> Iterator[Payload]:
    """Every Payload in ``message``, at any depth."""
    if isinstance(message, Payload):
        yield message
        return
    for _, value in message.ListFields():
        if isinstance(value, Message):
            yield from _payloads(value)
        elif isinstance(value, (str, bytes, int, float, bool)):
            continue
        else:  # a repeated field, or a map
            items = value.values() if hasattr(value, "values") else value
            for item in items:
                if isinstance(item, Message):
                    yield from _payloads(item)


def key_ids(*messages: Message) -> set[str]:
    """Ids of the keys that encrypted the payloads in ``messages``."""
    found = set()
    for message in messages:
        for payload in _payloads(message):
            if payload.metadata.get("encoding") == ENCODING:
                found.add(payload.metadata.get(KEY_ID_METADATA, b"").decode(errors="replace"))
    return found


def own_key_ids(client: temporalio.client.Client) -> list[str]:
    """Ids of the keys ``client`` decrypts with (none without encryption)."""
    for plugin in client.config().get("plugins", []):
        if isinstance(plugin, QwitPlugin) and plugin.encryption is not None:
            return plugin.encryption.key_ids
    return []


def missing_keys_text(missing: set[str], own: list[str]) -> str:
    """Which keys are missing, and where keys come from, in words."""
    names = ", ".join(repr(k) for k in sorted(missing))
    plural = "s" if len(missing) > 1 else ""
    if own:
        has = f"this process has only {', '.join(repr(k) for k in own)}"
    else:
        has = f"no keys are set here ({ENCRYPTION_KEYS_ENV} or {ENCRYPTION_KEY_FILE_ENV})"
    return f"encrypted with key id{plural} {names}, which this process lacks: {has}"


async def missing_keys(
    client: temporalio.client.Client, flow_id: str, run_id: str | None = None
) -> set[str]:
    """Ids of keys that encrypted part of the flow's history and that ``client`` lacks.

    Empty when nothing is missing, or when the history can't be read.
    """
    own = set(own_key_ids(client))
    handle = client.get_workflow_handle(flow_id, run_id=run_id)
    try:
        history = await handle.fetch_history()
    except RPCError:
        return set()
    return key_ids(*history.events) - own


__all__ = ["key_ids", "missing_keys", "missing_keys_text", "own_key_ids"]
