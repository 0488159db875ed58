"""Code of the Med3DVLM Slicer module, importable and testable outside Slicer.

qtcompat (Qt names) · chat_panel (the widget, no MRML) · logic (requests, no Qt) · worker (the
model thread) · volume_node (node -> Volume) · text_nodes (records in the scene) · settings ·
transcript (turns) · controller (panel <-> logic) · dependencies (first-use install in Slicer).
"""
