"""Clients of a ``med3dvlm serve`` model server.

transport (HTTP/1.1 over a non-blocking socket with h11, as generator tasks; a blocking driver
and a time-budgeted one for GUI timers) · tasks (one per endpoint; a volume sent once) · remote
(``med3dvlm.connect``: the pipeline's methods, answered by a server). Of the server's package only
``med3dvlm.wire`` is shared. No torch here: the Slicer module imports this package in Slicer's own
interpreter.
"""
