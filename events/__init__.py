"""SendGrid's Event Webhook: verified, applied to each message's status, the suppression lists
and the uncertain holds (docs/lifecycle.md). Served three ways: `events.app` (ASGI, `mailer
webhook`), `events.django.sendgrid_webhook` (a Django view), `events.handler.handle` (any
framework). Installed with the `webhook` extra.
"""
