"""Reports, conversations and findings kept as vtkMRMLTextNodes, so that saving the scene keeps them.

Each text node references its volume with a role that says what it holds: ``Med3DVLM.report``,
``Med3DVLM.conversation`` or ``Med3DVLM.findings``. The reference goes from the text node to the
volume, never the other way: recording a report must not mark a large volume as modified (Slicer
would offer to re-write it on save), and deleting a report must leave the volume alone.
The turns are JSON in the ``Med3DVLM.turns`` attribute; the node's text stays readable: the report
itself, or the conversation as Markdown.
"""

from __future__ import annotations

import json

from .transcript import Turn, now, transcript_markdown, turns_from_json, turns_to_json

REPORT_ROLE = "Med3DVLM.report"
CONVERSATION_ROLE = "Med3DVLM.conversation"
FINDINGS_ROLE = "Med3DVLM.findings"
ROLES = (REPORT_ROLE, CONVERSATION_ROLE, FINDINGS_ROLE)
TITLES = {REPORT_ROLE: "report", CONVERSATION_ROLE: "conversation", FINDINGS_ROLE: "findings"}

TURNS = "Med3DVLM.turns"
CREATED = "Med3DVLM.created"
MODEL = "Med3DVLM.model"
STATUS = "Med3DVLM.status"  # generating, complete, stopped, failed
ARCHIVED = "Med3DVLM.archived"  # "1" once the user cleared the chat: kept, no longer shown
PROVENANCE = "Med3DVLM.provenance"  # JSON: model, weights digest, preprocessing, settings of the last answer
FRAMING = "Med3DVLM.framing"  # JSON: the region and CT window a node's content is about (a score table's)


def create_record(scene, volume, role: str, model_name: str):
    """A new text node of kind ``role`` referencing ``volume``."""
    node = scene.AddNewNodeByClass("vtkMRMLTextNode")
    node.SetName(scene.GenerateUniqueName(f"{volume.GetName()} {TITLES[role]}"))
    with modifying(node):
        node.SetNodeReferenceID(role, volume.GetID())
        node.SetAttribute(CREATED, now())
        node.SetAttribute(MODEL, model_name)
        node.SetAttribute(STATUS, "generating")
    return node


def set_provenance(node, provenance: dict | None) -> None:
    """Keep how the node's latest content was made (any MRML node: text or table), saved with the scene."""
    if provenance:
        node.SetAttribute(PROVENANCE, json.dumps(provenance, sort_keys=True))


def provenance(node) -> dict | None:
    text = node.GetAttribute(PROVENANCE)
    return json.loads(text) if text else None


def set_framing(node, region: list | None, window: list | None) -> None:
    """Keep what the node's content is about: ``region`` (two opposite corners, RAS mm) and ``window``
    ((centre, width)), None for the whole volume in the model's own window."""
    node.SetAttribute(FRAMING, json.dumps({"region": region, "window": window}))


def framing(node) -> tuple[list | None, list | None]:
    """(region, window) as ``set_framing`` kept them; (None, None) when it never did."""
    kept = json.loads(node.GetAttribute(FRAMING) or "{}")
    return kept.get("region"), kept.get("window")


def record_role(node) -> str | None:
    return next((role for role in ROLES if node.GetNodeReferenceID(role)), None)


def records(scene, volume, role: str | None = None, include_archived: bool = False) -> list:
    """Text nodes of ``volume`` (of one ``role`` if given), oldest first."""
    found = []
    nodes = scene.GetNodesByClass("vtkMRMLTextNode")
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        node_role = record_role(node)
        if node_role is None or (role is not None and node_role != role):
            continue
        if node.GetNodeReferenceID(node_role) != volume.GetID():
            continue
        if include_archived or node.GetAttribute(ARCHIVED) != "1":
            found.append(node)
    return sorted(found, key=lambda n: n.GetAttribute(CREATED) or "")


def active_conversation(scene, volume):
    """The conversation still shown in the chat for ``volume``, or None."""
    conversations = records(scene, volume, CONVERSATION_ROLE)
    return conversations[-1] if conversations else None


def get_turns(node) -> list[Turn]:
    return turns_from_json(node.GetAttribute(TURNS))


def set_turns(node, turns: list[Turn], status: str | None = None) -> None:
    """Store ``turns`` (one Modified event, so views refresh once per update)."""
    role = record_role(node)
    with modifying(node):
        node.SetAttribute(TURNS, turns_to_json(turns))
        if role == CONVERSATION_ROLE:
            node.SetText(transcript_markdown(turns, title=node.GetName()))
        else:
            node.SetText(turns[-1].text if turns else "")
        if status is not None:
            node.SetAttribute(STATUS, status)


def session_turns(scene, volume) -> list[Turn]:
    """All turns shown in the chat for ``volume``: its unarchived reports, findings and conversation."""
    turns = [turn for node in records(scene, volume) for turn in get_turns(node)]
    return sorted(turns, key=lambda t: t.time)  # stable: a question stays before its answer


def archive_session(scene, volume) -> int:
    """Hide the volume's records from the chat (Clear) without deleting them; returns how many."""
    active = records(scene, volume)
    for node in active:
        node.SetAttribute(ARCHIVED, "1")
    return len(active)


class modifying:
    """StartModify/EndModify as a context manager."""

    def __init__(self, node) -> None:
        self.node = node

    def __enter__(self):
        self.was_modifying = self.node.StartModify()

    def __exit__(self, *exc) -> None:
        self.node.EndModify(self.was_modifying)
