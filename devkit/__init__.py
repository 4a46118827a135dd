"""Development stand-ins: a local SMTP sink with AUTH and TLS, a throwaway Redis, a worker
subprocess and the demo. Never imported by `mailer` or `workers` (the CLI's `demo` and `sink`
commands aside); installed with the `devkit` extra."""
