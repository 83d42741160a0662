"""llama.cpp's RPC backend (ggml-rpc), bound with ctypes: workers and their devices.

A worker runs llama.cpp's RPC server (`ggml_backend_rpc_start_server`) and exposes its
devices over TCP; a client registers it (`ggml_backend_rpc_add_server`), reads each
remote device's memory and places layers on it like on a local GPU. llama-cpp-python
binds none of this, so the few calls are declared here.

llama.cpp's RPC client calls abort() when a worker cannot be reached, speaks another
protocol version or stops answering. So before llama.cpp ever connects, every worker is
checked here with the protocol's own HELLO handshake, which turns the first two cases
into clean errors; a worker that dies while llama.cpp is talking to it cannot be
recovered in-process, so ggml's abort hook names the worker, lets the caller save what
it must (`add_rescue`) and ends the process with a one-line error instead of a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from localsmall.errors import LocalsmallError, UsageError

# The protocol of the llama.cpp that llama-cpp-python 0.3.36 vendors (ggml-rpc.h).
PROTOCOL = (7, 0, 0)
DEFAULT_PORT = 50052
_HELLO = 14             # RPC_CMD_HELLO, fixed across protocol versions
_CAPS = 24              # RPC_CONN_CAPS_SIZE: transport capabilities in the HELLO
_MAX_REPLY = 4096       # a HELLO reply longer than this is not llama.cpp's


class WorkerError(LocalsmallError):
    """An RPC worker cannot be used: unreachable, busy, or another protocol version."""


class WorkerLostError(WorkerError):
    """A worker stopped answering after the model was loaded on it."""


@dataclass(frozen=True)
class RemoteDevice:
    """One device a worker exposes, as this process sees it."""

    endpoint: str
    index: int            # the device's index on its worker
    name: str             # llama.cpp's name here: RPC0, RPC1, ...
    memory_free: int
    memory_total: int
    handle: int = field(default=0, compare=False, repr=False)  # ggml_backend_dev_t


# --- endpoints and the handshake --------------------------------------------------------


def parse_endpoint(text: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT ([v6]:PORT for IPv6); the port defaults to 50052."""
    text = text.strip()
    if not text:
        raise UsageError("an empty worker address; give HOST:PORT")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise UsageError(f"bad worker address {text!r}: the port must be a number") from None
    if not host or not 0 < port < 65536:
        raise UsageError(f"bad worker address {text!r}; give HOST:PORT, e.g. 192.168.1.7:50052")
    return host, port


def endpoint(text: str) -> str:
    """The canonical HOST:PORT llama.cpp is given for a worker address."""
    host, port = parse_endpoint(text)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoints(text: str | Sequence[str]) -> tuple[str, ...]:
    """Worker endpoints from `--rpc A,B` (or several --rpc values), duplicates refused."""
    parts = [p for item in ([text] if isinstance(text, str) else text)
             for p in item.split(",") if p.strip()]
    found = tuple(endpoint(p) for p in parts)
    if len(set(found)) != len(found):
        raise UsageError("the same worker is listed twice in --rpc")
    if not found:
        raise UsageError("--rpc needs at least one HOST:PORT")
    return found


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps a worker reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def handshake(address: str, *, timeout: float = 5.0) -> tuple[int, int, int]:
    """Connect to a worker and run the RPC HELLO; returns its protocol version. Raises
    WorkerError saying what is wrong (unreachable, busy, another protocol)."""
    ep = endpoint(address)
    host, port = parse_endpoint(ep)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        raise WorkerError(f"worker {ep} refused the connection: start it there with "
                          f"`localsmall worker --port {port}` (or check the port)") from None
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise WorkerError(f"cannot reach worker {ep} ({reason}): check the address, the "
                          "network and the firewall") from None
    with sock:
        try:
            sock.sendall(bytes([_HELLO]) + struct.pack("<Q", _CAPS) + bytes(_CAPS))
            head = _recv_exact(sock, 8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            reply = _recv_exact(sock, size) if 3 <= size <= _MAX_REPLY else b""
        except TimeoutError:
            raise WorkerError(
                f"worker {ep} accepted the connection but did not answer within "
                f"{timeout:g} s: a worker serves one client at a time; is another "
                "localsmall or llama.cpp using it?") from None
        except OSError as exc:
            reply, size = b"", 0
            if not isinstance(exc, ConnectionResetError):
                raise WorkerError(f"worker {ep} failed during the handshake "
                                  f"({exc.strerror or exc})") from None
    if len(reply) < 3:
        raise WorkerError(
            f"worker {ep} closed the connection during the RPC handshake: it is not a "
            f"llama.cpp RPC worker or speaks another protocol than this localsmall "
            f"({_version(PROTOCOL)}); run the same localsmall version on both machines")
    version = (reply[0], reply[1], reply[2])
    if version[0] != PROTOCOL[0] or version[1] > PROTOCOL[1]:
        raise WorkerError(
            f"worker {ep} speaks llama.cpp RPC protocol {_version(version)}, this "
            f"localsmall {_version(PROTOCOL)}: run the same localsmall (llama.cpp) "
            "version on both machines")
    return version


def _version(v: tuple[int, int, int]) -> str:
    return ".".join(map(str, v))


def reachable(address: str, *, timeout: float = 1.0) -> bool:
    """Whether a worker accepts TCP connections (no handshake: it may be serving us)."""
    host, port = parse_endpoint(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_TCP_CLOSE_WAIT = 8   # the peer closed its side: a worker that stopped or crashed


def _our_connections(address: str) -> list[int] | None:
    """TCP states of this process's sockets connected to `address` (Linux: read from
    /proc), or None where that cannot be known."""
    host, port = parse_endpoint(address)
    try:
        ips = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        inodes = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/self/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        states = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(FileNotFoundError), open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    remote, state, inode = fields[2], int(fields[3], 16), fields[9]
                    if inode in inodes and _proc_address(remote) in {(ip, port) for ip in ips}:
                        states.append(state)
        return states
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _proc_address(text: str) -> tuple[str, int]:
    """An address of /proc/net/tcp ("0100007F:C3A5") as (ip, port)."""
    hex_ip, hex_port = text.split(":")
    raw = bytes.fromhex(hex_ip)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # four little-endian 32-bit words
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        ip = socket.inet_ntop(socket.AF_INET6, words)
        if ip.startswith("::ffff:"):
            ip = ip[7:]
    return ip, int(hex_port, 16)


def lost(address: str) -> bool:
    """Whether a worker this process talks to is gone: it closed our connection, or
    (no connection open) it refuses new ones. A busy worker is not lost: it serves one
    client at a time and leaves new connections waiting."""
    states = _our_connections(address)
    if states:
        return _TCP_CLOSE_WAIT in states
    host, port = parse_endpoint(address)
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return False
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    except OSError:
        return False  # unknown (slow network, full queue): let llama.cpp find out


def check_alive(endpoints: Sequence[str]) -> None:
    """Raise WorkerLostError naming the workers that are gone (see `lost`)."""
    gone = [ep for ep in endpoints if lost(ep)]
    if gone:
        raise WorkerLostError(_lost_message(gone, when="since the model was loaded"))


def _lost_message(lost: Sequence[str], *, when: str, known: bool = True) -> str:
    names = ", ".join(lost)
    who = f"worker {names}" if known else f"one of the workers {names}"
    return (f"{who} stopped answering {when} (stopped, crashed or the network "
            "dropped); llama.cpp cannot go on without its layers: restart the worker and "
            "start again")


def _find_lost(endpoints: Sequence[str], *, wait: float = 2.0) -> list[str]:
    """The workers that are gone. Right after a worker is killed its process may still
    be tearing down (its port still takes connections on a busy machine), so look again
    for up to `wait` seconds before giving up."""
    deadline = time.monotonic() + wait
    while True:
        gone = [ep for ep in endpoints if lost(ep)]
        if gone or time.monotonic() >= deadline:
            return gone
        time.sleep(0.1)


# --- the client: registering workers ----------------------------------------------------


@cache
def library() -> Any:
    """libggml-rpc with the calls localsmall uses declared (loads llama.cpp)."""
    from localsmall.engine import native

    native.llama()
    lib = _load(native.lib_dir())
    vp, size_t, cstr = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    signatures: dict[str, tuple[list[Any], Any]] = {
        "ggml_backend_rpc_add_server": ([cstr], vp),
        "ggml_backend_rpc_get_device_memory": (
            [cstr, ctypes.c_uint32, ctypes.POINTER(size_t), ctypes.POINTER(size_t)], None),
        "ggml_backend_rpc_start_server": ([cstr, cstr, size_t, size_t,
                                           ctypes.POINTER(vp)], None),
    }
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def _load(lib_dir: str) -> Any:
    from localsmall.engine import native

    try:
        return native.load_ggml("ggml-rpc")
    except OSError:
        raise WorkerError("this llama.cpp build has no RPC backend (libggml-rpc); reinstall "
                          "with `make install` (RPC is on by default) or "
                          "CMAKE_ARGS=\"-DGGML_RPC=on\"") from None


def available() -> bool:
    """Whether the installed llama.cpp was built with its RPC backend."""
    from localsmall.engine import native

    try:
        return bool(native.llama().llama_supports_rpc()) and library() is not None
    except (WorkerError, AttributeError, OSError):
        return False


@cache
def _base() -> Any:
    from localsmall.engine import native

    lib = native.load_ggml("ggml-base")
    lib.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_name.restype = ctypes.c_char_p
    return lib


def device_memory(ep: str, index: int) -> tuple[int, int]:
    """(free, total) bytes of a worker's device, asked over the network."""
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    library().ggml_backend_rpc_get_device_memory(ep.encode(), index, ctypes.byref(free),
                                              ctypes.byref(total))
    return free.value, total.value


def connect(addresses: Sequence[str]) -> list[RemoteDevice]:
    """Check each worker (handshake), register it with llama.cpp and list its devices
    with their free memory, in the order given."""
    endpoints = [endpoint(a) for a in addresses]
    for ep in endpoints:
        handshake(ep)
    lib, base = library(), _base()
    guard_aborts(endpoints)
    devices = []
    for ep in endpoints:
        reg = lib.ggml_backend_rpc_add_server(ep.encode())
        count = base.ggml_backend_reg_dev_count(reg) if reg else 0
        if not count:
            raise WorkerError(f"worker {ep} exposes no device")
        for i in range(count):
            handle = base.ggml_backend_reg_dev_get(reg, i)
            free, total = device_memory(ep, i)
            devices.append(RemoteDevice(ep, i, base.ggml_backend_dev_name(handle).decode(),
                                        free, total, handle))
    return devices


# --- aborts inside llama.cpp's RPC client -----------------------------------------------

_abort_callback: Any = None
_watched: list[str] = []
_rescues: list[Callable[[], str]] = []
_reporter: list[Callable[[WorkerLostError], None]] = []
_RPC_ABORTS = ("Remote RPC server", "Failed to connect to", "RPC handshake failed")


def add_rescue(fn: Callable[[], str]) -> Callable[[], None]:
    """Run `fn` if the process must end because a worker was lost (it returns a note for
    the error message, e.g. where a conversation was saved). Returns the un-register."""
    _rescues.append(fn)
    return lambda: _rescues.remove(fn) if fn in _rescues else None


def set_reporter(fn: Callable[[WorkerLostError], None]) -> None:
    """How a lost worker is reported just before the process ends (the CLI prints it)."""
    _reporter[:] = [fn]


def guard_aborts(endpoints: Sequence[str]) -> None:
    """Install ggml's abort hook for these workers (see the module docstring)."""
    global _abort_callback
    for ep in endpoints:
        if ep not in _watched:
            _watched.append(ep)
    if _abort_callback is not None:
        return
    from localsmall.engine import native

    base = native.load_ggml("ggml-base")
    prototype = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
    _abort_callback = prototype(_on_abort)
    base.ggml_set_abort_callback.argtypes = [prototype]
    base.ggml_set_abort_callback.restype = ctypes.c_void_p
    base.ggml_set_abort_callback(_abort_callback)


def _on_abort(message: bytes | None) -> None:
    text = (message or b"").decode(errors="replace")
    if not any(marker in text for marker in _RPC_ABORTS):
        os.write(2, text.encode() + b"\n")
        return  # not ours: ggml aborts as it would have
    gone = _find_lost(_watched)
    notes = []
    for rescue in list(_rescues):
        with contextlib.suppress(BaseException):
            notes.append(rescue())
    exc = WorkerLostError(" ".join([_lost_message(gone or _watched, when="mid-reply",
                                                  known=bool(gone)),
                                    *[n for n in notes if n]]))
    for report in _reporter:
        with contextlib.suppress(BaseException):
            report(exc)
    if not _reporter:
        os.write(2, f"error: {exc}\n".encode())
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(exc.exit_code)
