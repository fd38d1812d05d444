"""Sealed spool files -> the destination: the queue and its retry policy, the local
(`file://`) destination, and S3 through a child process.
"""
