"""The wire contract between model servers and the daemon: frames, limits, name rules.

Both sides import it; it imports neither.
"""
