"""llama.cpp's RPC backend: serve this machine's devices to others, or use theirs for the next load.

The functions come from the ggml shared libraries that libllama itself links, looked up through
libllama's handle (as `engine.ggml` does too). The wheel ships `libggml.so` and `libggml.so.0` as
two separate files (no symlinks), so opening `libggml.so` by path would map a second copy with
its own backend registry: devices registered there are invisible to llama.cpp. Registering in the
copy libllama uses is what makes llama.cpp's default device list include the RPC devices.

Endpoints as users write them are parsed by `wizardchat.rpc_endpoints` (pure text, shared with
settings.py, so `--rpc`, WIZARDCHAT_RPC and config.toml get the same checks); this module checks
them on the wire.

C API (ggml/include/ggml-rpc.h of the llama.cpp vendored in llama-cpp-python 0.3.36, RPC protocol
7.0.0; the argument registers were checked in the built libggml-rpc.so):

    void ggml_backend_rpc_start_server(const char * endpoint, const char * cache_dir,
                                       size_t n_threads, size_t n_devices,
                                       ggml_backend_dev_t * devices);   // blocks
    ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint);

Both are reached as llama.cpp's own tools do, through
`ggml_backend_reg_get_proc_address(ggml_backend_reg_by_name("RPC"), name)`.

llama.cpp's RPC client aborts the whole process (GGML_ABORT) when a worker cannot be reached,
is not an RPC server, or speaks another protocol version, and its connect has no timeout. So
every endpoint is checked from Python first with the protocol's HELLO exchange. A worker that
fails after that (closes, answers nonsense) still makes the client abort: engine.model's abort
handler turns that into one line and exit 5. One that stops answering is waited for forever (the
client has no receive timeout), and Ctrl-C cannot interrupt that wait.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import ipaddress
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from wizardchat.engine import ggml
from wizardchat.engine.ggml import Device
from wizardchat.errors import LoadError, UsageError, WizardchatError
from wizardchat.rpc_endpoints import DEFAULT_PORT, parse_endpoint, parse_endpoints

REBUILD_HINT = (
    "rebuild llama-cpp-python with RPC: "
    'CMAKE_ARGS="-DGGML_RPC=on" pip install --no-cache-dir --force-reinstall '
    "llama-cpp-python==0.3.36 (keep your GPU flag in CMAKE_ARGS too, e.g. "
    '"-DGGML_RPC=on -DGGML_CUDA=on"; --no-cache-dir matters: pip otherwise reuses a cached '
    "wheel built without RPC)"
)

# The protocol of the vendored llama.cpp (RPC_PROTO_MAJOR/MINOR_VERSION in ggml-rpc.h). The
# client refuses a server whose major differs or whose minor is newer, by aborting.
RPC_PROTO_MAJOR, RPC_PROTO_MINOR = 7, 0
_CMD_HELLO = 14  # RPC_CMD_HELLO, fixed across protocol versions
_CONN_CAPS_SIZE = 24  # rpc_msg_hello_req is uint8_t conn_caps[24]; zeros mean plain TCP
_HELLO_RSP_SIZE = 4 + _CONN_CAPS_SIZE  # major, minor, patch, padding, conn_caps

_GPU_KINDS = ("GPU", "IGPU")
_MIB = 1024 * 1024
_READY_TIMEOUT_S = 10.0  # how long serve() waits for llama.cpp's server to start listening


# --- endpoints ---------------------------------------------------------------------------------
# Parsed by wizardchat.rpc_endpoints (pure, shared with settings); checked here on the wire.


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = parse_endpoint(endpoint).rpartition(":")
    return host, int(port)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def check_reachable(endpoint: str, timeout: float = 3.0) -> None:
    """Check that a compatible RPC worker answers at `endpoint`, or raise LoadError saying why.

    LoadError (exit 5) rather than UsageError: the endpoint is well formed (parse_endpoints
    checks that), it is the load that cannot use it. Beyond a TCP connect this does the
    protocol's HELLO, because llama.cpp aborts the process on anything but a good answer.
    """
    host, port = _split(endpoint)
    where = f"{host}:{port}"
    try:
        # llama.cpp's client resolves with gethostbyname: IPv4 only.
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror:
        raise LoadError(f"cannot reach RPC worker {where}: unknown host {host!r}") from None
    address = (str(infos[0][4][0]), port)
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except ConnectionRefusedError:
        raise LoadError(
            f"cannot reach RPC worker {where}: connection refused "
            "(is `wizardchat rpc-worker` running there, on that port?)"
        ) from None
    except TimeoutError:
        raise LoadError(
            f"cannot reach RPC worker {where}: no answer within {timeout:g} s "
            "(wrong address, or a firewall?)"
        ) from None
    except OSError as e:
        raise LoadError(f"cannot reach RPC worker {where}: {e.strerror or e}") from None
    with sock:
        try:
            sock.sendall(bytes([_CMD_HELLO]) + struct.pack("<Q", _CONN_CAPS_SIZE))
            sock.sendall(bytes(_CONN_CAPS_SIZE))
            (size,) = struct.unpack("<Q", _recv_exactly(sock, 8))
            if size < 3 or size > 4096:
                raise EOFError
            major, minor, patch = _recv_exactly(sock, size)[:3]
        except TimeoutError:
            raise LoadError(
                f"RPC worker {where} accepted the connection but did not answer within "
                f"{timeout:g} s (a worker serves one client at a time: is another one using "
                "it? Or it is not an RPC worker)"
            ) from None
        except (EOFError, OSError):
            raise LoadError(
                f"{where} is not a compatible llama.cpp RPC worker (it closed the connection "
                "or answered something else to the RPC handshake)"
            ) from None
    if major != RPC_PROTO_MAJOR or minor > RPC_PROTO_MINOR:
        raise LoadError(
            f"RPC worker {where} speaks RPC protocol {major}.{minor}.{patch}; this build speaks "
            f"{RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}: run the same wizardchat and "
            "llama-cpp-python version on both machines"
        )
    if size != _HELLO_RSP_SIZE:  # llama.cpp would abort on a handshake of another size
        raise LoadError(
            f"{where} answered the RPC handshake with {size} bytes, not {_HELLO_RSP_SIZE}"
        )


# --- the C API --------------------------------------------------------------------------------


class _Api:
    """The ggml backend registry that libllama uses, and the RPC entry points it exposes."""

    def __init__(self, backend: str = "RPC") -> None:
        from wizardchat.engine.llama_lib import lib as bindings

        # dlsym through libllama's handle searches libllama's own dependencies: its libggml.
        # `lib[name]` makes a fresh function object, leaving llama_cpp's cached ones alone.
        lib = bindings._lib
        vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t

        def fn(name: str, argtypes: list[Any], restype: Any) -> Any:
            f = lib[name]
            f.argtypes, f.restype = argtypes, restype
            return f

        self.reg_by_name = fn("ggml_backend_reg_by_name", [cp], vp)
        self.reg_get_proc_address = fn("ggml_backend_reg_get_proc_address", [vp, cp], vp)
        self.reg_dev_count = fn("ggml_backend_reg_dev_count", [vp], sz)
        self.reg_dev_get = fn("ggml_backend_reg_dev_get", [vp, sz], vp)
        self.device_register = fn("ggml_backend_device_register", [vp], None)
        self.dev_name = fn("ggml_backend_dev_name", [vp], cp)

        self.rpc_reg = self.reg_by_name(backend.encode())
        add = (
            self.reg_get_proc_address(self.rpc_reg, b"ggml_backend_rpc_add_server")
            if self.rpc_reg
            else None
        )
        start = (
            self.reg_get_proc_address(self.rpc_reg, b"ggml_backend_rpc_start_server")
            if self.rpc_reg
            else None
        )
        if not add or not start:
            raise UsageError(f"this llama-cpp-python was built without RPC support; {REBUILD_HINT}")
        self.add_server = ctypes.CFUNCTYPE(vp, cp)(add)
        self.start_server = ctypes.CFUNCTYPE(None, cp, cp, sz, sz, ctypes.POINTER(vp))(start)


@functools.cache
def _api() -> _Api:
    """The RPC API, loaded once; a UsageError ending with REBUILD_HINT when the build lacks it."""
    return _Api()


_added: dict[str, list[str]] = {}  # endpoint -> names of its devices, once registered
_added_lock = threading.Lock()


def add_servers(endpoints: Sequence[str], timeout: float = 3.0) -> list[str]:
    """Register RPC workers' devices with llama.cpp so that the next model load uses them.

    Every endpoint is checked first (check_reachable; nothing is registered if one fails).
    Returns the device names (e.g. "RPC0") of all the given endpoints, as `ggml.devices()`
    lists them; an endpoint already added in this process is not added again. llama.cpp puts
    RPC devices first in its default device list and spreads the offloaded layers over them and
    the local GPUs by free memory, so the load must ask for offload (n_gpu_layers > 0).
    """
    wanted = parse_endpoints(endpoints)  # settings did this already; other callers get it too
    api = _api()
    from wizardchat.engine.llama_log import install_abort_handler

    install_abort_handler()  # a worker failing after the handshake makes llama.cpp abort
    with _added_lock:
        for endpoint in wanted:
            if endpoint not in _added:
                check_reachable(endpoint, timeout)
        for endpoint in wanted:
            if endpoint in _added:
                continue
            reg = api.add_server(endpoint.encode())
            if not reg:
                raise LoadError(f"RPC worker {endpoint} serves no devices")
            devices = [api.reg_dev_get(reg, i) for i in range(api.reg_dev_count(reg))]
            for dev in devices:
                api.device_register(dev)
            _added[endpoint] = [api.dev_name(dev).decode() for dev in devices]
        return [name for endpoint in wanted for name in _added[endpoint]]


# --- the worker -------------------------------------------------------------------------------


def _stderr_line(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _bind_address(host: str) -> ipaddress.IPv4Address:
    try:
        # llama.cpp's server binds with inet_addr(): an IPv4 literal, no names.
        return ipaddress.IPv4Address("127.0.0.1" if host == "localhost" else host)
    except ValueError:
        raise UsageError(
            f"cannot listen on {host!r}: llama.cpp's RPC server needs an IPv4 address "
            "(127.0.0.1 for this machine only, 0.0.0.0 for all interfaces)"
        ) from None


def _describe(d: Device) -> str:
    return (
        f"{d.name} ({d.description}, {d.free_bytes // _MIB} MiB free of "
        f"{d.total_bytes // _MIB} MiB)"
    )


def _pick_devices(names: Sequence[str]) -> list[Device]:
    local = [d for d in ggml.devices() if d.backend != "RPC"]
    if not names:
        # llama.cpp's rpc-server serves every accelerator, else the CPU.
        gpus = [d for d in local if d.kind in _GPU_KINDS]
        return gpus or [d for d in local if d.kind == "CPU"][:1]
    by_name = {d.name.lower(): d for d in local}
    picked: list[Device] = []
    for name in names:
        dev = by_name.get(name.strip().lower())
        if dev is None:
            available = ", ".join(f"{d.name} ({d.description})" for d in local) or "none"
            raise UsageError(f"unknown device {name!r}; available here: {available}")
        if dev not in picked:
            picked.append(dev)
    return picked


def _check_port_free(address: str, port: int) -> None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as llama.cpp's server
        try:
            probe.bind((address, port))
        except OSError as e:
            raise UsageError(f"cannot listen on {address}:{port}: {e.strerror or e}") from None


def _wait_listening(address: str, port: int, server: threading.Thread) -> None:
    """Wait until llama.cpp's server accepts connections (a bare connect is closed at once)."""
    target = "127.0.0.1" if address == "0.0.0.0" else address
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while server.is_alive() and time.monotonic() < deadline:
        try:
            socket.create_connection((target, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    reason = "it stopped (its reason is printed above)" if not server.is_alive() else "timeout"
    raise WizardchatError(f"llama.cpp's RPC server did not start on {address}:{port}: {reason}")


def serve(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    devices: Sequence[str] = (),
    cache_dir: Path | None = None,
    threads: int = 0,
    allow_remote: bool = False,
    announce: Callable[[str], None] = _stderr_line,
) -> None:
    """Serve this machine's devices to RPC clients until Ctrl-C (KeyboardInterrupt) or SIGTERM.

    `devices` names backend devices (default: every GPU, else the CPU, as llama.cpp's
    rpc-server); `cache_dir` lets clients skip sending tensors the worker saw before; `threads`
    0 means one per physical core. A non-loopback `host` needs `allow_remote`. Returns after
    SIGTERM; llama.cpp's own lines ("Accepted client connection", ...) go to stdout.
    """
    if not 1 <= port <= 65535:
        raise UsageError(f"port {port} is out of range 1-65535")
    address = _bind_address(host)
    if not address.is_loopback and not allow_remote:
        raise UsageError(
            f"refusing to listen on {address}: the RPC protocol has no authentication, so "
            "anyone who can reach the port can use this machine's devices and memory; pass "
            "--allow-remote to serve on a trusted network"
        )
    if not address.is_loopback:
        # Said before anything listens, like llama.cpp's rpc-server.
        announce(
            "warning: the RPC protocol has no authentication or encryption: anyone who can "
            f"reach {address}:{port} can use this machine's devices and memory. Serve only "
            "on a trusted network."
        )
    if threads < 0:
        raise UsageError(f"threads must be 0 (automatic) or more, not {threads}")
    api = _api()
    served = _pick_devices(devices)
    if not served:
        raise UsageError("no device to serve")
    if threads == 0:
        from wizardchat.plan import machine as hardware

        threads = hardware.physical_cores()
    cache = None
    if cache_dir is not None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the cache directory {cache_dir}: {e}") from None
        cache = str(cache_dir).encode()
    _check_port_free(str(address), port)

    endpoint = f"{address}:{port}".encode()
    handles = (ctypes.c_void_p * len(served))(*(d.handle for d in served))

    def run() -> None:
        # The endpoint, cache path and device array stay referenced here while C runs.
        api.start_server(endpoint, cache, threads, len(served), handles)

    stop = threading.Event()
    with _stop_on_sigterm(stop):
        server = threading.Thread(target=run, name="rpc-server", daemon=True)
        server.start()
        _wait_listening(str(address), port, server)
        announce(
            f"RPC worker listening on {address}:{port}, serving "
            + "; ".join(_describe(d) for d in served)
            + f" with {threads} thread{'' if threads == 1 else 's'} (Ctrl-C to stop)"
        )
        # The C server blocks in accept() for good; waiting with a timeout keeps this thread
        # running Python's signal handlers (Ctrl-C raises KeyboardInterrupt here). The daemon
        # thread ends with the process.
        while not stop.is_set() and server.is_alive():
            stop.wait(0.25)
    if not stop.is_set():
        raise WizardchatError("llama.cpp's RPC server stopped unexpectedly (see its output)")


@contextlib.contextmanager
def _stop_on_sigterm(stop: threading.Event) -> Iterator[None]:
    """While inside, SIGTERM sets `stop` instead of killing the process (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
