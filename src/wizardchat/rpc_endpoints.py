"""llama.cpp RPC endpoints as users write them (`HOST:PORT[,HOST:PORT...]`), parsed in one place.

Pure text rules, no llama_cpp: settings.py runs every `--rpc`, WIZARDCHAT_RPC and config `rpc`
value through parse_endpoints, and engine/rpc.py uses the same rules for one endpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

from wizardchat.errors import UsageError

DEFAULT_PORT = 50052
_LIST_FORM = "(expected HOST:PORT[,HOST:PORT...])"


def parse_endpoint(item: str) -> str:
    """One "HOST:PORT" in canonical form (port without leading zeros); bad input is a UsageError."""
    example = f"expected HOST:PORT, e.g. 192.168.1.20:{DEFAULT_PORT}"
    if "[" in item or item.count(":") > 1:
        raise UsageError(
            f"bad RPC endpoint {item!r}: llama.cpp's RPC speaks IPv4 only; "
            "use an IPv4 address or a host name"
        )
    host, sep, port = item.rpartition(":")
    if not sep or not port:
        raise UsageError(f"bad RPC endpoint {item!r}: missing port ({example})")
    if not host:
        raise UsageError(f"bad RPC endpoint {item!r}: missing host ({example})")
    if not host.replace(".", "").replace("-", "").replace("_", "").isalnum() or not host.isascii():
        raise UsageError(f"bad RPC endpoint {item!r}: {host!r} is not a host name or address")
    if not port.isdecimal() or not port.isascii():
        raise UsageError(f"bad RPC endpoint {item!r}: port {port!r} is not a number")
    number = int(port)
    if not 1 <= number <= 65535:
        raise UsageError(f"bad RPC endpoint {item!r}: port {number} is out of range 1-65535")
    return f"{host}:{number}"


def parse_endpoints(given: str | Sequence[str]) -> list[str]:
    """Parse "HOST:PORT[,HOST:PORT...]" (or a list of them, as config.toml may write it) into
    canonical endpoints, each once; empty, malformed or repeated entries are a UsageError."""
    in_text = isinstance(given, str)
    items = [item.strip() for item in (given.split(",") if isinstance(given, str) else given)]
    if not any(items):
        raise UsageError(f"no RPC endpoint given {_LIST_FORM}")
    if "" in items:
        where = " between commas" if in_text else ""
        raise UsageError(f"bad RPC endpoint list {given!r}: an empty entry{where}")
    endpoints: list[str] = []
    for item in items:
        endpoint = parse_endpoint(item)
        if endpoint in endpoints:
            raise UsageError(f"RPC endpoint {endpoint} is listed twice")
        endpoints.append(endpoint)
    return endpoints
