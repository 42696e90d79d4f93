"""Ray service actors of raycord: cache, context, rate limiter and analytics sink.

Each service is a plain Python class (testable without Ray) plus a client that talks to
its sharded actor handles; `bot/runtime.py` turns the classes into actors.
"""
