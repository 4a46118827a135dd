"""The private parts of the libraries we build on, one module per library.

Each module lists, as `PRIVATE`, every attribute or function the code touches that its library
does not document as public, with the reason we touch it; tests/unit/test_private_api.py checks
each entry against the installed release (it exists; a callable still takes the parameters we
pass), so an upgrade that moves one fails there, by name, rather than in production. The
pyproject.toml pins each library below its next minor release for the same reason.

- celery: `workers/compat/celery.py`
- kombu: `workers/compat/kombu.py`
- aiosmtplib: `workers/engine/protocol.py` (the engine imports neither Celery nor kombu)
- asyncio (standard library): `workers/engine/loop.py` (`SSLProtocol.max_size`)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Private:
    """One private attribute of a library that our code reads, writes, calls or overrides."""

    owner: Any  # the class or module that defines it
    name: str
    why: str  # one line: what we use it for
    params: tuple[str, ...] = ()  # the parameters our calls or overrides rely on
    instance: bool = False  # set by `__init__` on each instance, not on the class
