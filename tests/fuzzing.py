"""Shared pieces of the property-based (hypothesis) tests of localsmall's parsers of
untrusted input: settings, a GGUF encoder that can lie about every length, and a
check that a call raises nothing but localsmall's own errors within time and memory.

Every fuzz test asserts the same contract: the parser returns normally or raises a
LocalsmallError subclass whose message is one line; never another exception, never a
hang (hypothesis' per-example deadline) and never memory out of proportion to the input
(tracemalloc's peak, where a test measures it).
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from localsmall.errors import LocalsmallError

T = TypeVar("T")

# Deadlines are far above a case's normal time (milliseconds) so that a loaded or slow
# machine never fails them, yet far below a hang (the bugs these tests guard against
# took minutes).
DEADLINE_MS = 5000


def fuzz_settings(max_examples: int, deadline_ms: int = DEADLINE_MS) -> settings:
    """Settings of one fuzz test: `max_examples` cases, a per-case deadline, no example
    database written into the checkout."""
    return settings(max_examples=max_examples, deadline=deadline_ms, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much])


@dataclass
class CaseLog:
    """Cases run and the longest one, for the fuzz report."""

    cases: int = 0
    failures: int = 0         # cases that raised another exception or broke a bound
    longest_s: float = 0.0


LOGS: dict[str, CaseLog] = {}


def only_own_errors(target: str, call: Callable[[], T], *,
                    max_peak_bytes: int | None = None) -> T | LocalsmallError:
    """Run `call`; return its result or the LocalsmallError it raised (with a one-line
    message). Any other exception propagates and fails the test. With `max_peak_bytes`,
    the Python allocations' peak must stay below it."""
    log = LOGS.setdefault(target, CaseLog())
    if max_peak_bytes is not None:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        result: T | LocalsmallError = call()
    except LocalsmallError as exc:
        message = str(exc)
        if not message or "\n" in message:
            log.failures += 1
            raise AssertionError(f"not a one-line error: {message!r}") from None
        result = exc
    except BaseException:
        log.failures += 1
        raise
    finally:
        elapsed = time.perf_counter() - start
        log.cases += 1
        log.longest_s = max(log.longest_s, elapsed)
        if max_peak_bytes is not None:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    if max_peak_bytes is not None and peak > max_peak_bytes:
        log.failures += 1
        raise AssertionError(f"{peak} bytes allocated (bound {max_peak_bytes})")
    return result


# --- GGUF encoding ----------------------------------------------------------------------

GGUF_U8, GGUF_I8, GGUF_U16, GGUF_I16, GGUF_U32, GGUF_I32, GGUF_F32, GGUF_BOOL = range(8)
GGUF_STRING, GGUF_ARRAY, GGUF_U64, GGUF_I64, GGUF_F64 = 8, 9, 10, 11, 12
SCALAR_FORMATS = {GGUF_U8: "B", GGUF_I8: "b", GGUF_U16: "H", GGUF_I16: "h", GGUF_U32: "I",
                  GGUF_I32: "i", GGUF_F32: "f", GGUF_BOOL: "?", GGUF_U64: "Q", GGUF_I64: "q",
                  GGUF_F64: "d"}


def gguf_string(text: str | bytes, length: int | None = None) -> bytes:
    """A GGUF string; `length` overrides the declared length (a lie)."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def gguf_value(vtype: int, value: Any) -> bytes:
    """A typed value's bytes (without its type id). Arrays: (item type, [values])."""
    if vtype == GGUF_STRING:
        return gguf_string(value)
    if vtype == GGUF_ARRAY:
        item_type, items = value
        return struct.pack("<IQ", item_type, len(items)) + b"".join(
            gguf_value(item_type, v) for v in items)
    return struct.pack("<" + SCALAR_FORMATS[vtype], value)


def gguf_kv(key: str, vtype: int, value: Any) -> bytes:
    return gguf_string(key) + struct.pack("<I", vtype) + gguf_value(vtype, value)


def gguf_tensor_info(name: str, shape: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    return (gguf_string(name) + struct.pack("<I", len(shape)) +
            b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<IQ", ggml_type, offset))


def gguf_file(kvs: list[bytes], tensors: list[bytes], *, n_kv: int | None = None,
              n_tensors: int | None = None, version: int = 3, tail: bytes = b"") -> bytes:
    """A GGUF file from encoded entries; the counts may lie."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None
                                 else n_tensors, len(kvs) if n_kv is None else n_kv)
    return head + b"".join(kvs) + b"".join(tensors) + tail


def gguf_model(values: dict[str, tuple[int, Any]], tensors: list[tuple[str, tuple[int, ...]]],
               arch: str = "llama") -> bytes:
    """A model-like GGUF: general.architecture, `values` under the architecture's
    prefix, F32 tensors (no data) with the given names and shapes."""
    kvs = [gguf_kv("general.architecture", GGUF_STRING, arch)]
    kvs += [gguf_kv(f"{arch}.{k}", t, v) for k, (t, v) in values.items()]
    infos = [gguf_tensor_info(name, shape, 0, 0) for name, shape in tensors]
    return gguf_file(kvs, infos)


# --- strategies ---------------------------------------------------------------------------

HUGE = st.sampled_from([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63,
                        2**64 - 1, 4_000_000_000])
LENGTHS = st.one_of(st.integers(0, 64), HUGE)


def scalar_values(vtype: int) -> st.SearchStrategy[Any]:
    fmt = SCALAR_FORMATS[vtype]
    if fmt in "fd":
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if fmt == "f" else 64)
    if fmt == "?":
        return st.booleans()
    bits = struct.calcsize(fmt) * 8
    if fmt.islower():
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return st.integers(0, 2**bits - 1)


@st.composite
def typed_values(draw: st.DrawFn, depth: int = 0) -> tuple[int, bytes]:
    """(type id, encoded value) of any GGUF type, arrays nested a few levels, with some
    declared lengths that lie."""
    choices = [*SCALAR_FORMATS, GGUF_STRING] + ([GGUF_ARRAY] if depth < 3 else [])
    vtype = draw(st.sampled_from(choices))
    if vtype == GGUF_STRING:
        text = draw(st.binary(max_size=16))
        lie = draw(st.one_of(st.none(), LENGTHS))
        return vtype, gguf_string(text, lie)
    if vtype == GGUF_ARRAY:
        items = draw(st.lists(typed_values(depth + 1), max_size=4))
        item_type = items[0][0] if items else draw(st.integers(0, 14))
        count = draw(st.one_of(st.just(len(items)), LENGTHS))
        return vtype, struct.pack("<IQ", item_type, count) + b"".join(v for _, v in items)
    return vtype, gguf_value(vtype, draw(scalar_values(vtype)))
