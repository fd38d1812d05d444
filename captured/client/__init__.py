"""The client library a model server imports: a sans-I/O core shared by a thread driver
(`sync.CaptureClient`) and an asyncio driver (`aio.AsyncCaptureClient`).

Importing it imports neither the daemon nor its configuration, aiobotocore or uvloop.
"""
