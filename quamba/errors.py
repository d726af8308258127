"""Errors a user can act on: each names the file or key at fault and what is allowed."""


class QuambaError(Exception):
    """Base class for every error raised at quamba's boundaries."""


class CheckpointError(QuambaError):
    """A model directory or checkpoint file is missing, corrupt, or of an unknown kind."""


class ConfigError(QuambaError):
    """A configuration value is missing or outside what is allowed."""


class ResultError(QuambaError):
    """A computed result is not a number (NaN or inf): never written as if it were one."""
