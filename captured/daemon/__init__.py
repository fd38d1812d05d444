"""The daemon's hot path: ingest (socket, frames, sessions) -> pipeline (sampling, encoding)
-> spool (hourly files, journal) under the disk watermark; recovery of what a crash left.
"""
