"""edgellm: a serving fabric for LLM work on edge boxes and small clusters.

Layers (imports point one way, left to right never back):
``protocol`` (wire formats, no I/O) <- ``comm`` (ZeroMQ) <- ``manager`` / ``unit`` / ``units`` /
``kvevents``; ``kvindex`` knows nothing of sockets; ``discovery`` feeds ``kvevents``.
"""

__version__ = "0.1.0"
