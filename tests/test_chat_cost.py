"""What an image turn costs here and the budget that bounds it (localsmall.chat.cost),
and how a session applies them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from localsmall.chat.cost import (
    TURN_TEXT,
    ImagePolicy,
    budget_for,
    cost_note,
    fixed_budget,
    image_limit,
    image_seconds,
)
from localsmall.chat.session import ChatSession, Reply
from localsmall.chat.speeds import MEASURED, PLANNED, STORED, Speeds, measured_speeds
from localsmall.engine.model import Engine
from localsmall.engine.types import SamplingSettings, TurnStats
from localsmall.errors import UsageError
from localsmall.images import prepare_image
from localsmall.plan.assumed import cpu_prompt_speed
from localsmall.plan.hardware import CpuInfo, Hardware
from localsmall.runtime import speed_memory

# A 2-core CPU with the 24B model: 1.5 s per llama_decode call, 6 positions/s read;
# the encoder 2 s per image plus 40 tokens/s.
SLOW_CPU = Speeds(batch_s=1.5, token_s=1 / 6, encode_s=2.0, encode_token_s=1 / 40,
                  source=PLANNED)
ONE_CALL = ImagePolicy(auto=True, n_batch=512, together=True)


def test_an_image_turn_costs_its_fixed_parts_and_its_tokens() -> None:
    n = 89
    read = (n + TURN_TEXT) / 6
    assert image_seconds(n, SLOW_CPU, ONE_CALL) == pytest.approx(2.0 + n / 40 + 1.5 + read)
    # mtmd's helper: the text before and after the image take a call each
    apart = ImagePolicy(auto=True, together=False)
    assert image_seconds(n, SLOW_CPU, apart) == pytest.approx(
        image_seconds(n, SLOW_CPU, ONE_CALL) + 2 * 1.5)
    # a small n_batch splits the read into more calls
    small = ImagePolicy(auto=True, n_batch=64)
    assert image_seconds(n, SLOW_CPU, small) == pytest.approx(
        image_seconds(n, SLOW_CPU, ONE_CALL) + 1.5)


def test_the_budget_keeps_the_turn_under_the_target() -> None:
    budget = budget_for(SLOW_CPU, ONE_CALL)
    assert image_seconds(budget, SLOW_CPU, ONE_CALL) <= 20.0 < image_seconds(
        budget + 1, SLOW_CPU, ONE_CALL)
    # per-token cost alone would allow (20 s) / (1/6 + 1/40 s) = 104 tokens; the fixed
    # parts (3.5 s) and the question's text (24 positions, 4 s) take their share
    assert 60 < budget < 80
    # three calls instead of one: 3 s less for the image
    apart = budget_for(SLOW_CPU, ImagePolicy(auto=True, together=False))
    assert budget - apart == pytest.approx(3.0 / (1 / 6 + 1 / 40), abs=1)
    fast = Speeds(0.01, 0.0002, 0.01, 0.0002, MEASURED)
    assert budget_for(fast, ONE_CALL) == 1024                           # the model's cap
    assert budget_for(SLOW_CPU.scaled(10, MEASURED), ONE_CALL) == 16   # never below 16


@pytest.mark.parametrize("load", [1.0, 2.0, 4.0])
def test_the_budget_follows_a_slower_machine(load: float) -> None:
    # Issue 16 measured the same CPU 1x to 10x slower under other agents' load: the budget
    # shrinks with it, keeping the predicted turn under the target while one fits.
    slower = SLOW_CPU.scaled(load, MEASURED)
    budget = budget_for(slower, ONE_CALL)
    assert budget < budget_for(SLOW_CPU, ONE_CALL) or load == 1.0
    assert image_seconds(budget, slower, ONE_CALL) <= 20.0 or budget == 16


def test_measured_speeds_replace_the_plan_and_say_so() -> None:
    assert measured_speeds([], SLOW_CPU) is SLOW_CPU
    assert measured_speeds([], None) is None
    short = TurnStats(evaluated_tokens=5, prompt_eval_s=0.01, read_batches=1)
    assert measured_speeds([short], SLOW_CPU) is SLOW_CPU  # too short to tell
    # A read of 100 positions in one call, 2x slower than planned, no reply timed yet:
    # both reading figures scaled by 2, and encoding with them.
    planned_read = 1.5 + 100 / 6
    text = TurnStats(evaluated_tokens=100, prompt_eval_s=2 * planned_read, read_batches=1)
    speeds = measured_speeds([text, short], SLOW_CPU)
    assert speeds is not None and speeds.source == MEASURED
    assert speeds.batch_s == pytest.approx(3.0) and speeds.token_s == pytest.approx(2 / 6)
    assert speeds.encode_s == pytest.approx(4.0) and speeds.encode_token_s == pytest.approx(
        2 / 40)


def test_a_timed_reply_separates_the_fixed_cost_from_the_per_token_one() -> None:
    # 9 tokens generated in 8 steps of 4 s (a llama_decode call each); a read of 100
    # positions in one call took 4 + 100 x 0.2 s.
    turn = TurnStats(evaluated_tokens=100, prompt_eval_s=24.0, read_batches=1,
                     generated_tokens=9, generation_s=32.0)
    speeds = measured_speeds([turn], SLOW_CPU)
    assert speeds is not None
    assert speeds.batch_s == pytest.approx(4.0) and speeds.token_s == pytest.approx(0.2)
    # a measured encode: 2x the planned one for its 89 tokens
    image = TurnStats(evaluated_tokens=113, images_encoded=1, image_tokens_encoded=89,
                      image_encode_s=2 * (2.0 + 89 / 40), prompt_eval_s=100.0,
                      read_batches=1)
    speeds = measured_speeds([turn, image], SLOW_CPU)
    assert speeds is not None
    assert speeds.encode_s == pytest.approx(4.0) and speeds.encode_token_s == pytest.approx(
        2 / 40)
    # two encodes of different sizes: the fixed and per-token parts fitted apart
    small = replace(image, image_tokens_encoded=11, image_encode_s=2.0 + 11 * 0.1)
    large = replace(image, image_tokens_encoded=155, image_encode_s=2.0 + 155 * 0.1)
    speeds = measured_speeds([turn, small, large], SLOW_CPU)
    assert speeds is not None
    assert speeds.encode_s == pytest.approx(2.0) and speeds.encode_token_s == pytest.approx(0.1)
    # a reply timed but no long read: the plan's reading scaled by the measured batch
    reply = TurnStats(evaluated_tokens=8, prompt_eval_s=1.0, read_batches=1,
                      generated_tokens=5, generation_s=12.0)
    speeds = measured_speeds([reply], SLOW_CPU)
    assert speeds is not None and speeds.batch_s == pytest.approx(3.0)
    assert speeds.token_s == pytest.approx(2 / 6)


def test_image_limit_follows_the_policy() -> None:
    assert image_limit(ImagePolicy(), SLOW_CPU) is None                  # GPU: full size
    assert image_limit(ImagePolicy(max_tokens=200, auto=True), SLOW_CPU) == 200
    assert image_limit(ONE_CALL, SLOW_CPU) == budget_for(SLOW_CPU, ONE_CALL)
    assert image_limit(ONE_CALL, None) is None
    assert fixed_budget(ImagePolicy(auto=True, base=SLOW_CPU)) == budget_for(SLOW_CPU)
    assert fixed_budget(ImagePolicy()) is None


def test_cost_notes(make_image) -> None:
    path = make_image("photo.png", 504, 504)
    full = prepare_image(path)
    note = cost_note(full, SLOW_CPU, automatic=False, policy=ONE_CALL)
    seconds = image_seconds(341, SLOW_CPU, ONE_CALL)
    assert note.startswith(f"This image is 341 tokens: about {seconds:.0f} s to the first "
                           "token here (1.5 s per batch + 6.0 tok/s reading, the plan's "
                           "estimate).")
    budget = budget_for(SLOW_CPU, ONE_CALL)
    assert f"/image --tokens {budget} {path}" in note
    small = prepare_image(path, max_tokens=budget)
    auto = cost_note(small, SLOW_CPU, automatic=True, policy=ONE_CALL)
    assert f"photo.png is scaled to {small.n_tokens} tokens (from 341)" in auto
    assert f"/image --tokens 341 {path}" in auto
    assert "to keep this CPU near 20 s per image: about" in auto
    busy = SLOW_CPU.scaled(10, MEASURED)
    tiny = prepare_image(path, max_tokens=budget_for(busy, ONE_CALL))
    assert tiny.n_tokens <= 16
    assert "(as small as images go: this CPU is too slow or busy for 20 s per image)" in \
        cost_note(tiny, busy, automatic=True, policy=ONE_CALL)
    fast = Speeds(0.01, 0.0005, 0.01, 0.0005, MEASURED)
    assert cost_note(full, fast, automatic=False) == ""  # quick
    assert cost_note(full, None, automatic=False) == ""


def test_speeds_are_remembered_for_the_next_session(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 10)
    where = speed_memory.memory_path(model=model, mmproj=None, n_threads=2, cpu="Xeon",
                                     root=tmp_path / "speeds")
    assert speed_memory.recall(where) is None
    speed_memory.remember(where, SLOW_CPU.scaled(2, MEASURED))
    assert speed_memory.recall(where) == SLOW_CPU.scaled(2, STORED)
    # another thread count, CPU or a rewritten model file: other speeds
    other = speed_memory.memory_path(model=model, mmproj=None, n_threads=1, cpu="Xeon",
                                     root=tmp_path / "speeds")
    assert other != where and speed_memory.recall(other) is None
    model.write_bytes(b"y" * 11)
    assert speed_memory.memory_path(model=model, mmproj=None, n_threads=2, cpu="Xeon",
                                    root=tmp_path / "speeds") != where
    # a damaged or hostile file is ignored
    for junk in (b"{", b'{"batch_s": "NaN", "token_s": 1, "encode_s": 1, '
                       b'"encode_token_s": 1}', b"[]", b"x" * 10_000):
        where.write_bytes(junk)
        assert speed_memory.recall(where) is None


def test_the_plan_estimates_prompt_and_image_speed() -> None:
    def machine(features: tuple[str, ...], cores: int) -> Hardware:
        return Hardware(gpus=(), gpu_offload=False, ram_total=0, ram_available=0,
                        cpu=CpuInfo("cpu", cores, cores, features))

    # Mistral Small 3.2: 24B weights (671M of them the embedding), an 878 MB F16 tower.
    args = {"n_params": 23_572_403_200, "n_lookup_params": 671_088_640,
            "vision_params": 878_000_000 // 2}
    fast = cpu_prompt_speed(machine(("AVX2", "AVX512", "AVX512_VNNI"), 2), **args)
    assert 3 < fast.prompt_tps < 10 and 20 < fast.image_tps < 80  # issue 16 saw 6 and 40
    slow = cpu_prompt_speed(machine(("AVX2",), 2), **args)
    assert slow.prompt_tps < fast.prompt_tps
    assert cpu_prompt_speed(machine(("AVX2",), 8), **args, n_threads=4).prompt_tps == \
        pytest.approx(2 * slow.prompt_tps)
    assert cpu_prompt_speed(machine((), 2), n_params=10**9).image_tps == 0


GREEDY = SamplingSettings(temperature=0.0, max_tokens=2)


@pytest.fixture
def cpu_session(engine: Engine) -> ChatSession:
    engine.reset()
    return ChatSession(engine, system_prompt="", sampling=GREEDY,
                       images=ImagePolicy(auto=True, base=SLOW_CPU))


def test_a_cpu_session_scales_images_to_its_budget_and_says_so(cpu_session: ChatSession,
                                                                make_image) -> None:
    path = make_image("photo.png", 504, 504)
    result = cpu_session.handle(f"/image {path}")
    assert not isinstance(result, Reply) and result is not None
    budget = budget_for(SLOW_CPU, cpu_session.image_policy)
    (image,) = cpu_session.pending_images
    assert image.n_tokens <= budget < 341 and image.downscaled
    assert f"is scaled to {image.n_tokens} tokens (from 341)" in result.message

    # /image --tokens N PATH replaces the attached copy at the size asked for
    result = cpu_session.handle(f"/image --tokens 200 {path}")
    assert result is not None and not isinstance(result, Reply)
    (image,) = cpu_session.pending_images
    assert 150 < image.n_tokens <= 200
    assert "This image is" in result.message  # over 20 s: the cost is said, not a scale
    reply = cpu_session.handle("What is it?")
    assert isinstance(reply, Reply) and reply.images == (image,)
    list(reply)
    assert reply.stats.image_tokens_encoded == image.n_tokens
    with pytest.raises(UsageError, match="--tokens needs a number"):
        cpu_session.handle(f"/image --tokens 4 {path}")
    with pytest.raises(UsageError, match="usage"):
        cpu_session.handle("/image --tokens 100")


def test_a_measured_turn_replaces_the_plans_estimate(cpu_session: ChatSession,
                                                    make_image) -> None:
    reply = cpu_session.handle("Some words to read. " * 20)
    assert isinstance(reply, Reply)
    list(reply)
    speeds = cpu_session.speeds()
    assert speeds is not None and speeds.source == MEASURED
    # The tiny model reads far faster than 6 tokens/s: no scaling, no note.
    image = cpu_session.attach(str(make_image("photo.png", 504, 504)))
    assert not image.downscaled and cpu_session.cost_note(image) == ""


def test_a_budget_survives_save_and_load(cpu_session: ChatSession, make_image,
                                         tmp_path: Path) -> None:
    path = make_image("photo.png", 504, 504)
    cpu_session.handle(f"/image --tokens 100 {path}")
    reply = cpu_session.handle("What is it?")
    assert isinstance(reply, Reply)
    list(reply)
    cpu_session.save(tmp_path / "chat.json")
    loaded = cpu_session.load(tmp_path / "chat.json")
    (image,) = loaded.conversation.messages[0].images
    assert image.n_tokens <= 100 and image.max_tokens == 100


def test_a_session_hands_its_measured_speeds_on(engine: Engine) -> None:
    kept: list[Speeds] = []
    session = ChatSession(engine, system_prompt="", sampling=GREEDY,
                          images=ImagePolicy(auto=True, base=SLOW_CPU, remember=kept.append))
    reply = session.handle("Some words to read. " * 20)
    assert isinstance(reply, Reply)
    list(reply)
    assert kept == [session.speeds()] and kept[0].source == MEASURED
