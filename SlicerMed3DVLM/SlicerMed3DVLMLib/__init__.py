"""Code of the Med3DVLM Slicer module, importable and testable outside Slicer.

qtcompat (Qt names) · chat_panel (the widget, no MRML) · logic (requests, no Qt) · server_link
(requests to the model server, from a timer) · local_server (the module's own server process) ·
volume_node (node -> Volume) · text_nodes (records in the scene) · settings · transcript (turns) ·
controller (panel <-> logic) · dependencies (first-use install in Slicer) · demo_notice.
"""
