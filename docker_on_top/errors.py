"""The two kinds of failure a caller can get back."""

from __future__ import annotations


class PluginError(Exception):
    """Any failure that is reported to the caller as `{"Err": str(error)}`."""


class UserError(PluginError):
    """The request itself was wrong: bad name, bad option, missing volume."""


class InternalError(PluginError):
    """Something failed inside the plugin; the message says it is not the user's fault."""

    def __init__(self, what: str, cause: BaseException | str) -> None:
        super().__init__(f"docker-on-top internal error: {what}: {cause}")
        self.what = what
        self.cause = cause


class BusyError(PluginError):
    """The volume's lock stayed taken past the request's bound; the message says by what."""
