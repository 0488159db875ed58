"""The model server, ``med3dvlm serve``: one model loaded once, served over HTTP to the Slicer
module (its own local server by default, or a remote GPU machine) and to ``med3dvlm.connect``.

What server and clients agree on is ``med3dvlm.wire``. Here: config (limits, bind, token) · auth ·
volumes (uploaded volumes by content digest) · jobs (the queue: one job at a time on the model) ·
endpoints/ (one router per endpoint) · app (the FastAPI application) · serve (the process).
"""
