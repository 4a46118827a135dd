"""Exceptions app code sees. Each names what is wrong, never a secret."""

from __future__ import annotations


class MailerError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MailerError):
    """A configuration value is missing or wrong; raised at start-up, naming the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable}: {problem}")


class InvalidMessage(MailerError, ValueError):
    """A message was refused at enqueue time; `field` names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class PublishError(MailerError):
    """The broker did not take the message: unreachable past the bounded publish retries, or it
    refused the commands (out of memory). Nothing of the call was queued."""
