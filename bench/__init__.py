"""ipcd's benchmark: ipcd against the raw System V IPC limit, in one interleaved run.

``make bench`` (``python -m bench``) runs it; ``bench.run`` lists the steps.
"""
