"""Who may ask the studio what.

- On 127.0.0.1 (the default) only this machine reaches it. On any other address a token is required on
  every request: as `?token=` once (it is then kept in a cookie for that browser), an `X-Sdlora-Token`
  header, or `Authorization: Bearer`.
- A request that changes something (any method but GET/HEAD) must also carry the `X-Sdlora-Token` header
  when a token is set, and in every case come from the studio's own pages: an `Origin` (or `Referer`)
  naming the host it was sent to. Another web site open in the same browser cannot send either.
- The Host header must name the address the studio listens on (or localhost): a DNS name rebound to
  127.0.0.1 by another site is refused.
- Files are served only from inside their folder, symlinks resolved (`inside`).
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import SdloraError

TOKEN_HEADER = "x-sdlora-token"
TOKEN_COOKIE = "sdlora_token"
MAX_BODY = 1 << 20  # request bodies: a config or a caption, never more than this


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


def same(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def host_allowed(host_header: str, bind_host: str) -> bool:
    """The Host a browser sent names this studio: its own address, or a loopback name when it listens on one."""
    name = urlsplit(f"//{host_header}").hostname or ""
    if bind_host in ("0.0.0.0", "::"):
        return True  # reached under any of the machine's names; the token is the guard then
    return name == bind_host or (loopback(bind_host) and loopback(name))


def same_origin(origin: str | None, referer: str | None, host_header: str) -> bool:
    """The request came from a page of this studio: its Origin (or, without one, its Referer) is this host."""
    source = origin if origin and origin != "null" else referer
    if not source:
        return False
    return urlsplit(source).netloc == host_header


class OutsideFolder(SdloraError, ValueError):
    """A path that is not inside the folder it must stay in once resolved (`..`, absolute, a symlink out)."""


def inside(root: Path, relative: str) -> Path:
    """`root / relative`, refused unless it stays inside `root` once every symlink is resolved."""
    if not relative or "\x00" in relative or Path(relative).is_absolute():
        raise OutsideFolder(f"{relative!r} is not a path inside {root}")
    base = root.resolve()
    path = (base / relative).resolve()
    if path != base and base not in path.parents:
        raise OutsideFolder(f"{relative!r} leads outside {root}")
    return path
