"""The service shell: configuration, the command line, the daemon's orchestration,
systemd integration, status, metrics and logs.
"""
