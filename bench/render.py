"""Rendering alone: microseconds per `Message.render()` for the common message shapes, with and
without the final guard on the bytes (mailer/guard.py), and the worker's `check_wire` alone.

    python bench/render.py                 # 20,000 renders per shape, best of 5
    python bench/render.py --count 5000 --repeat 3

Prints a table; figures are noisy on a shared machine (best of N repeats is shown).
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mailer import render as render_module  # noqa: E402
from mailer.guard import check_wire  # noqa: E402
from mailer.message import Attachment, Message  # noqa: E402

FROM = "Bench <bench@example.com>"
BODY = "The quick brown fox jumps over the lazy dog. " * 20 + "\n"  # ~900 bytes

SHAPES: dict[str, Message] = {
    "text 1 KiB": Message(to="user@example.com", subject="Render bench", text=BODY, from_addr=FROM),
    "text + html": Message(
        to="Ann Example <ann@example.com>",
        subject="Render bench",
        text=BODY,
        html=f"<p>{BODY}</p>",
        from_addr=FROM,
    ),
    "non-ASCII": Message(
        to="Zoë Ünïcode <zoe@example.com>",
        subject="Grüße aus Köln",
        text="Grüße " * 150,
        from_addr=FROM,
        headers={"X-Campaign": "spring-2026", "Sender": "Bötchen <b@example.com>"},
    ),
    "attachment": Message(
        to="user@example.com",
        subject="Render bench",
        text=BODY,
        attachments=[Attachment("report.pdf", b"%PDF-1.4 " * 200, "application/pdf")],
        from_addr=FROM,
    ),
}


def best_us(fn: Callable[[], object], count: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=count, repeat=repeat)) / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"{'shape':<12} {'render us':>10} {'no guard':>9} {'guard':>7} {'check_wire':>11}")
    for name, message in SHAPES.items():
        render_us = best_us(message.render, args.count, args.repeat)
        real = render_module.check_rendered
        render_module.check_rendered = _no_guard  # type: ignore[assignment]
        try:
            bare_us = best_us(message.render, args.count, args.repeat)
        finally:
            render_module.check_rendered = real
        data = message.render().data
        wire_us = best_us(lambda d=data: check_wire(d), args.count, args.repeat)  # type: ignore[misc]
        print(
            f"{name:<12} {render_us:>10.1f} {bare_us:>9.1f} "
            f"{(render_us - bare_us) / render_us:>7.0%} {wire_us:>11.1f}"
        )
    return 0


def _no_guard(data: bytes, intended: object) -> None:
    return None


if __name__ == "__main__":
    raise SystemExit(main())
