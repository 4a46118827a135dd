"""The Lua scripts of `workers/state/lua/`, read from the installed package.

Files rather than Python strings so that they read (and lint) as Lua; read with
`importlib.resources`, so they come from wherever the package is installed (the wheel carries
them as package data, see pyproject.toml). What each script does is in its own header.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def source(*names: str) -> str:
    """The text of `lua/<name>.lua` for each name, joined in order (a library first)."""
    folder = files("workers.state").joinpath("lua")
    return "".join(folder.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in names)


def names() -> list[str]:
    """Every script the package ships, without the `.lua`."""
    folder = files("workers.state").joinpath("lua")
    return sorted(p.name[: -len(".lua")] for p in folder.iterdir() if p.name.endswith(".lua"))
