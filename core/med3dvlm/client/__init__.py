"""Clients of a ``med3dvlm serve`` model server.

transport (HTTP/1.1 over a non-blocking socket with h11, as generator tasks; a blocking driver
and a time-budgeted one for GUI timers) · tasks (upload a volume once, run a job and read its
events) · remote (``med3dvlm.connect``: the pipeline's methods, answered by a server).
No torch here: the Slicer module imports this package in Slicer's own interpreter.
"""
