"""Errors raised to users. Every message is one line that says what to do."""


class PluginError(Exception):
    """A plugin cannot be built, registered or run with the given settings."""


class ExpertError(Exception):
    """An expert pool cannot be trained, loaded or used (wrong cache, missing files, ...)."""
