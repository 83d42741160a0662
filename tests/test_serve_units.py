"""The server's pieces without HTTP: stop strings over streamed text, request validation,
and the warm slots (several conversations in one context, least recently used evicted)
on the real tiny model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from localsmall.engine.kvcache import positions
from localsmall.engine.model import Engine
from localsmall.engine.types import EngineSettings, SamplingSettings, TokenRun
from localsmall.server.errors import ApiError
from localsmall.server.requests import ImageRef, parse_chat_request
from localsmall.server.slots import SlotPool, default_slots
from localsmall.server.stops import StopMatcher
from tests.conftest import TinyModels


@pytest.mark.parametrize("split", range(1, 12))
def test_stop_matcher_at_every_split(split: int) -> None:
    text = "Hello world. STOP here"
    matcher = StopMatcher(("STOP", "xyz"))
    sent = matcher.feed(text[:split]) + matcher.feed(text[split:])
    assert matcher.stopped and sent + matcher.flush() == "Hello world. "


def test_stop_matcher_releases_held_text() -> None:
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("abc ST") == "abc "  # "ST" could begin STOP
    assert matcher.feed("ART") == "START"
    assert matcher.feed("S") == ""
    assert matcher.flush() == "S" and not matcher.stopped


def test_parse_request() -> None:
    body = {"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "data:x"}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "abcdefghi", "type": "function",
             "function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "tool_call_id": "abcdefghi", "content": "42"}],
        "max_completion_tokens": 7, "stop": "END", "seed": -1, "user": "ignored"}
    request = parse_chat_request(body, model_ids=("m",))
    roles = [m.role for m in request.messages]
    assert roles == ["system", "user", "assistant", "tool"]
    assert request.messages[1].parts[1] == ImageRef("data:x", "messages[1].content[1].image_url")
    assert request.messages[2].tool_calls[0].arguments == '{"a": 1}'
    assert (request.max_tokens, request.stop, request.seed) == (7, ("END",), 0xFFFFFFFF)


@pytest.mark.parametrize(("change", "status", "param"), [
    ({"model": "other"}, 404, "model"),
    ({"messages": []}, 400, "messages"),
    ({"n": 3}, 400, "n"),
    ({"top_p": 0}, 400, "top_p"),
    ({"stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "data:x"}}]}]}, 400, "messages[0].content[0]"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
])
def test_bad_request_names_param(change: dict[str, object], status: int, param: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(ApiError) as error:
        parse_chat_request(body, model_ids=("m",))
    assert (error.value.status, error.value.param) == (status, param)


def test_default_slots() -> None:
    assert [default_slots(n) for n in (2048, 8192, 32768, 131072)] == [1, 2, 8, 8]


@pytest.fixture(scope="module")
def shared(tiny: TinyModels) -> Iterator[Engine]:
    with Engine(EngineSettings(model_path=tiny.f16, n_ctx=1024, n_threads=1, n_seq=3)) as e:
        yield e


def _prompt(engine: Engine, text: str) -> list[TokenRun]:
    return [TokenRun(tuple(engine.tokenize(f"<s>[INST]{text}[/INST]", special=True)))]


def _run(engine: Engine, pool: SlotPool, prompt: list[TokenRun]) -> tuple[int, int, int]:
    """(slot, positions reused, positions evaluated) for one short reply."""
    choice = pool.select(engine.layout(prompt))
    result = engine.generate(prompt, SamplingSettings(temperature=0, max_tokens=2)).run()
    return choice.seq_id, result.stats.reused_tokens, result.stats.evaluated_tokens


def test_slots_keep_conversations_and_evict_the_oldest(shared: Engine) -> None:
    engine = shared
    for kv in engine.sequences:
        kv.truncate(0)
    pool = SlotPool(engine)
    long = "word " * 400  # ~400 tokens: three conversations do not fit in 1024 cells
    a, b, c = (_prompt(engine, f"{name} {long}") for name in ("alpha", "beta", "gamma"))
    slot_a, reused, _ = _run(engine, pool, a)
    assert reused == 0
    reply_a = tuple(engine.sequences[slot_a].items[positions(engine.layout(a)):])
    slot_b, _, _ = _run(engine, pool, b)
    assert slot_b != slot_a
    # A follow-up of A finds its whole conversation in its slot.
    follow_a = [*a, TokenRun(reply_a + tuple(engine.tokenize(" more", special=False)))]
    slot, reused, evaluated = _run(engine, pool, follow_a)
    assert slot == slot_a and evaluated < 10 and reused >= positions(engine.layout(a)) - 1
    # C needs room: B, the least recently used, is evicted; A stays warm.
    slot_c, _, _ = _run(engine, pool, c)
    assert slot_c not in (slot_a,) and pool.evictions >= 1
    assert not engine.sequences[slot_b].items or slot_c == slot_b
    slot, reused, evaluated = _run(engine, pool, follow_a)
    assert slot == slot_a and evaluated <= 2


def test_a_branch_borrows_the_shared_prefix(shared: Engine) -> None:
    engine = shared
    for kv in engine.sequences:
        kv.truncate(0)
    pool = SlotPool(engine)
    base = "shared context " * 40
    first = _prompt(engine, base + "question one " * 20)  # tails longer than SMALL_TAIL
    second = _prompt(engine, base + "question two " * 20)
    slot_1, _, _ = _run(engine, pool, first)
    slot_2, reused, evaluated = _run(engine, pool, second)
    assert slot_2 != slot_1  # the first conversation stays intact
    assert reused > 80 and evaluated < 50  # the shared prefix came from slot 1's cells
    assert engine.sequences[slot_1].items  # still warm
    # Regenerating the second reply (the same prompt again) stays in its slot.
    slot, reused, evaluated = _run(engine, pool, second)
    assert slot == slot_2 and evaluated <= 1


def test_cli_refuses_a_port_in_use_and_bad_flags(tiny: TinyModels) -> None:
    import socket

    from typer.testing import CliRunner

    from localsmall.cli import app

    runner = CliRunner()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["serve", "--model", str(tiny.f16), "--port", str(port)])
    assert result.exit_code == 2 and "cannot listen on 127.0.0.1" in result.output
    assert "Traceback" not in result.output
    for flags, message in ((["--slots", "0"], "--slots"), (["--queue", "0"], "--queue")):
        result = runner.invoke(app, ["serve", "--model", str(tiny.f16), *flags])
        assert result.exit_code == 2 and message in result.output


async def _last_event(scheduler: object, job: object, *, submit: bool = True) -> object:
    """Submit `job` to `scheduler` (unless already submitted) and return its first event
    that is not a token (its end). Imports stay inside the tests, as the server's modules
    do for the engine."""
    import asyncio

    if submit:
        scheduler.submit(job)  # type: ignore[attr-defined]
    while True:
        event = await asyncio.wait_for(job.events.get(), 120)  # type: ignore[attr-defined]
        if not hasattr(event, "token_id"):
            return event


def test_long_steps_reach_the_request_log(shared: Engine) -> None:
    """The scheduler hands the engine a progress callback whose lines reach the request
    log (every step counts as long here, so the test does not depend on speed)."""
    import asyncio

    from localsmall.server.prompting import ReplyMemory
    from localsmall.server.scheduler import Finished, Job, RequestLog, Scheduler

    for kv in shared.sequences:
        kv.truncate(0)
    entries: list[RequestLog] = []
    scheduler = Scheduler(shared, replies=ReplyMemory(), on_log=entries.append)
    scheduler.progress_after_s = 0.0

    async def one_request() -> object:
        job = Job("chatcmpl-progress", _prompt(shared, "word " * 100),
                  SamplingSettings(temperature=0, max_tokens=2), asyncio.get_running_loop())
        return await _last_event(scheduler, job)

    scheduler.start()
    try:
        assert isinstance(asyncio.run(one_request()), Finished)
    finally:
        scheduler.stop()
    progress = [e.message for e in entries if e.phase == "progress"]
    assert progress and progress[-1].startswith("reading prompt")
    assert "(100%)" in progress[-1]


def test_submit_says_whether_the_worker_starts_the_job_at_once(shared: Engine) -> None:
    """The route waits (briefly) for an idle worker to take its job: submit says when
    the worker is idle, and `picked` is set once the worker has taken the job."""
    import asyncio

    from localsmall.server.prompting import ReplyMemory
    from localsmall.server.scheduler import Finished, Job, Scheduler

    for kv in shared.sequences:
        kv.truncate(0)
    scheduler = Scheduler(shared, replies=ReplyMemory())

    async def two_requests() -> list[object]:
        loop = asyncio.get_running_loop()
        first = Job("chatcmpl-a", _prompt(shared, "one"),
                    SamplingSettings(temperature=0, max_tokens=2), loop)
        second = Job("chatcmpl-b", _prompt(shared, "two"),
                     SamplingSettings(temperature=0, max_tokens=2), loop)
        # Not started yet: the first job waits in the queue, so the second is not next.
        assert scheduler.submit(first) is True
        assert scheduler.submit(second) is False
        assert not first.picked.is_set() and not second.picked.is_set()
        scheduler.start()
        ends = [await _last_event(scheduler, job, submit=False) for job in (first, second)]
        assert first.picked.is_set() and second.picked.is_set()
        return ends

    try:
        assert all(isinstance(end, Finished) for end in asyncio.run(two_requests()))
    finally:
        scheduler.stop()


def test_the_server_sizes_images_to_its_budget() -> None:
    from localsmall.chat.cost import ImagePolicy, budget_for, fixed_budget
    from localsmall.chat.speeds import PLANNED, Speeds
    from localsmall.server.image_urls import ImageLimits, prepare
    from tests.tinymodels import image_bytes

    slow_cpu = Speeds(batch_s=1.5, token_s=0.2, encode_s=2.0, encode_token_s=0.025,
                      source=PLANNED)
    assert fixed_budget(ImagePolicy(max_tokens=64, auto=True, base=slow_cpu)) == 64
    policy = ImagePolicy(auto=True, base=slow_cpu)
    assert fixed_budget(policy) == budget_for(slow_cpu, policy) < 1024
    assert fixed_budget(ImagePolicy()) is None  # a GPU: full resolution
    ref = ImageRef(url="data:image/png;base64,", param="messages[0].content[0]")
    data = image_bytes(504, 504)
    full = prepare(ref, data, 0)
    small = prepare(ref, data, 0, ImageLimits(max_tokens=40))
    assert small.n_tokens <= 40 < full.n_tokens


@pytest.mark.parametrize(("host", "public"), [
    ("127.0.0.1", False), ("127.0.0.2", False), ("localhost", False), ("::1", False),
    ("[::1]", False), ("0.0.0.0", True), ("::", True), ("", True), ("192.168.1.20", True),
    ("my-laptop.lan", True)])
def test_exposure_warning(host: str, public: bool) -> None:
    from localsmall.server.runner import exposure_warning, is_loopback

    assert is_loopback(host) is not public
    bare, keyed = exposure_warning(host, api_key=False), exposure_warning(host, api_key=True)
    if not public:
        assert bare is None and keyed is None
        return
    assert bare is not None and keyed is not None
    assert "anyone on the network can use it" in bare and "--api-key" in bare
    assert "anyone" not in keyed and "API key" in keyed and "plain HTTP" in keyed


def test_cli_warns_before_listening_beyond_loopback(tiny: TinyModels) -> None:
    """The warning comes first, before the socket is even tried (192.0.2.1 is a
    documentation address no machine has: nothing gets bound here)."""
    import socket

    from typer.testing import CliRunner

    from localsmall.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--model", str(tiny.f16), "--host", "192.0.2.1",
                                 "--port", "0"], env={"LOCALSMALL_API_KEY": ""})
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "cannot listen on 192.0.2.1" in output
    assert "anyone on the network can use it" in output
    assert output.index("anyone on the network") < output.index("cannot listen")
    keyed = runner.invoke(app, ["serve", "--model", str(tiny.f16), "--host", "192.0.2.1",
                                "--port", "0", "--api-key", "k"])
    keyed_output = " ".join(keyed.output.split())
    assert "plain HTTP" in keyed_output and "anyone" not in keyed_output
    with socket.socket() as busy:  # loopback: no warning (the port is taken to stop there)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        local = runner.invoke(app, ["serve", "--model", str(tiny.f16), "--port",
                                    str(busy.getsockname()[1])])
    assert local.exit_code == 2 and "network" not in local.output


def test_a_resent_tool_call_is_laid_out_with_its_generated_tokens(shared: Engine) -> None:
    """The client sends a tool call back as id, name and arguments; tokenizing those
    afresh may split them otherwise than the model did. A call the server answered is
    laid out with the tokens it generated (here deliberately split character by
    character, which no tokenizer would do), so the resent turn is found in the cache."""
    from localsmall.chat.tools import ToolCall
    from localsmall.server.prompting import PromptBuilder, calls_key

    builder = PromptBuilder(shared, system_prompt="")
    call = ToolCall("a1B2c3D4e", "get_weather", '{"city":"Paris"}')  # as a model may write
    text = f"[TOOL_CALLS]{call.name}[CALL_ID]{call.id}[ARGS]{call.arguments}"
    generated = [*shared.tokenize("[TOOL_CALLS]", special=True),
                 *[t for ch in call.name for t in shared.tokenize(ch, special=False)],
                 *shared.tokenize("[CALL_ID]", special=True),
                 *[t for ch in call.id for t in shared.tokenize(ch, special=False)],
                 *shared.tokenize("[ARGS]", special=True),
                 *[t for ch in call.arguments for t in shared.tokenize(ch, special=False)]]
    assert shared.detokenize(generated, special=True) == text

    def prompt(arguments: str) -> list[int]:
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}}]
        body = {"model": "m", "tools": tools, "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": call.name, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]}
        pieces = builder.build(parse_chat_request(body, model_ids=("m",)), {})
        return [t for p in pieces if isinstance(p, TokenRun) for t in p.ids]

    def contains(tokens: list[int], run: list[int]) -> bool:
        return any(tokens[i:i + len(run)] == run for i in range(len(tokens)))

    fresh = prompt(call.arguments)
    assert not contains(fresh, generated)  # re-tokenized: other tokens
    builder.replies.remember_calls(content=None, calls=[call], token_ids=tuple(generated))
    resent = prompt(call.arguments)
    assert contains(resent, generated) and resent != fresh
    # The client's own formatting of the same arguments is the same call...
    assert prompt('{\n  "city": "Paris"\n}') == resent
    # ...other arguments are another call.
    assert not contains(prompt('{"city": "Lyon"}'), generated)
    # Another id (the client's own) is another call.
    assert builder.replies.tokens_for(calls_key("", [call])) == tuple(generated)
    assert builder.replies.tokens_for(calls_key("", [ToolCall("zzzzzzzzz", call.name,
                                                              call.arguments)])) is None


def test_connections_send_without_delay() -> None:
    """The server's connections have Nagle's algorithm off: with it on, the second write
    of a response (the body after the headers, a token after the role chunk) waits for
    the client's delayed ACK, ~40 ms on every answer. asyncio (under uvicorn) sets
    TCP_NODELAY only on connections of a socket created as TCP."""
    import asyncio
    import socket

    from localsmall.server.runner import bind

    async def accepted_nodelay() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                conn = transport.get_extra_info("socket")
                seen.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        listener = bind("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        port = listener.getsockname()[1]
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            value = await asyncio.wait_for(seen, 30)
            writer.close()
            return value
        finally:
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_a_resent_data_url_is_found_and_a_near_twin_is_not(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """Recent data: URLs are found again without decoding; a URL that shares the cheap
    lookup key (length and the sampled slices) but differs elsewhere is never taken for
    it."""
    import asyncio
    import base64

    from localsmall.server import image_urls
    from localsmall.server.image_urls import ImageLimits, RecentImages, load_image
    from tests.tinymodels import image_bytes

    monkeypatch.setattr(image_urls, "RECENT", RecentImages())
    url = "data:image/png;base64," + base64.b64encode(image_bytes(64, 48)).decode()
    limits = ImageLimits()
    first = asyncio.run(load_image(ImageRef(url, "p"), limits, 1))
    decoded: list[str] = []
    real_decode = image_urls.decode_data_url
    monkeypatch.setattr(image_urls, "decode_data_url",
                        lambda ref, lim: decoded.append(ref.url) or real_decode(ref, lim))
    assert asyncio.run(load_image(ImageRef(url[:10] + url[10:], "q"), limits, 1)) is first
    assert decoded == []  # found again, not decoded
    assert image_urls.known_image(ImageRef(url, "r"), limits) is first
    assert image_urls.known_image(ImageRef(url, "r"), ImageLimits(max_tokens=40)) is None
    # Same length, start, middle and end: one base64 character changed after the start.
    i = 100
    twin = url[:i] + ("A" if url[i] != "A" else "B") + url[i + 1:]
    assert RecentImages._key(twin, limits) == RecentImages._key(url, limits)
    assert image_urls.known_image(ImageRef(twin, "s"), limits) is None


def test_recent_images_are_bounded_by_count_and_characters() -> None:
    from localsmall.server.image_urls import ImageLimits, RecentImages

    limits = ImageLimits()
    recent = RecentImages(size=2, max_chars=100)
    image = object()
    for url in ("data:a" * 5, "data:b" * 5, "data:c" * 5):
        recent.put(url, limits, image)  # type: ignore[arg-type]
    assert recent.get("data:a" * 5, limits) is None  # the oldest went (count)
    assert recent.get("data:c" * 5, limits) is image
    recent.put("data:d" * 15, limits, image)  # type: ignore[arg-type]  # 90 characters
    assert recent.get("data:b" * 5, limits) is None  # went for room (characters)
    assert recent.get("data:d" * 15, limits) is image
    recent.put("data:" + "e" * 200, limits, image)  # type: ignore[arg-type]  # never kept
    assert recent.get("data:" + "e" * 200, limits) is None


def test_stage_trace_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from localsmall.engine.types import TurnStats
    from localsmall.server.responses import timings
    from localsmall.server.trace import mark, new_trace

    monkeypatch.delenv("LOCALSMALL_SERVE_TRACE", raising=False)
    assert new_trace() is None
    mark(None, "anything")  # a no-op
    assert "trace" not in timings(TurnStats())
    monkeypatch.setenv("LOCALSMALL_SERVE_TRACE", "1")
    trace = new_trace()
    assert trace == {}
    mark(trace, "a")
    first = trace["a"]
    mark(trace, "a")  # the first end counts
    mark(trace, "b")
    assert trace["a"] == first <= trace["b"]
    assert timings(TurnStats(), trace)["trace"] == trace


def test_scheduler_stages_and_log_order(shared: Engine) -> None:
    """A traced job records the worker's stages in order, and the request log says
    'started' before the end line even though it is written after the first token."""
    import asyncio

    from localsmall.server.prompting import ReplyMemory
    from localsmall.server.scheduler import Finished, Job, RequestLog, Scheduler

    for kv in shared.sequences:
        kv.truncate(0)
    entries: list[RequestLog] = []
    scheduler = Scheduler(shared, replies=ReplyMemory(), on_log=entries.append)
    traces = []

    async def one_request(tokens: int) -> object:
        job = Job(f"chatcmpl-stages{tokens}", _prompt(shared, f"count {tokens}"),
                  SamplingSettings(temperature=0, max_tokens=tokens),
                  asyncio.get_running_loop(), trace={})
        traces.append(job.trace)
        return await _last_event(scheduler, job)

    scheduler.start()
    try:
        for tokens in (1, 5):
            assert isinstance(asyncio.run(one_request(tokens)), Finished)
    finally:
        scheduler.stop()
    for trace in traces:
        assert trace is not None
        assert list(trace) == ["picked", "slot", "first_token", "first_posted"]
        assert sorted(trace.values()) == list(trace.values())
    phases = [(e.id, e.phase) for e in entries]
    assert phases == [("chatcmpl-stages1", "started"), ("chatcmpl-stages1", "finished"),
                      ("chatcmpl-stages5", "started"), ("chatcmpl-stages5", "finished")]
