"""Django settings for the tests that run Django (one configuration per process: every test
module that imports Django calls `configure()` first)."""

from __future__ import annotations

import django
from django.conf import settings


def configure() -> None:
    """The settings a project using the mailer has: our backend and real sender addresses."""
    if settings.configured:
        return
    settings.configure(
        EMAIL_BACKEND="mailer.django.EmailBackend",
        DEFAULT_FROM_EMAIL="Django App <app@example.com>",
        SERVER_EMAIL="Django Errors <errors@example.com>",
        INSTALLED_APPS=["mailer.django.MailerConfig"],
        USE_TZ=True,
    )
    django.setup()
