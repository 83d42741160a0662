"""What an image turn costs here and the budget that bounds it (localsmall.chat.cost),
and how a session applies them."""

from __future__ import annotations

from pathlib import Path

import pytest

from localsmall.chat.cost import (
    MEASURED,
    PLANNED,
    ImagePolicy,
    Speeds,
    budget_for,
    cost_note,
    image_limit,
    image_seconds,
    measured_speeds,
)
from localsmall.chat.session import ChatSession, Reply
from localsmall.engine.model import Engine
from localsmall.engine.types import SamplingSettings, TurnStats
from localsmall.errors import UsageError
from localsmall.images import prepare_image
from localsmall.plan.assumed import cpu_prompt_speed
from localsmall.plan.hardware import CpuInfo, Hardware

# The figures of issue 16: a 341-token image, encoded at 40 tokens/s, read at 6 tokens/s.
SLOW_CPU = Speeds(prompt_tps=6.0, image_tps=40.0, source=PLANNED)


def test_seconds_and_budget() -> None:
    assert image_seconds(341, SLOW_CPU) == pytest.approx(341 / 6 + 341 / 40)
    budget = budget_for(SLOW_CPU, 20.0)
    assert image_seconds(budget, SLOW_CPU) <= 20.0 < image_seconds(budget + 1, SLOW_CPU)
    assert budget_for(Speeds(5000, 5000, PLANNED), 20.0) == 1024   # fast: the model's cap
    assert budget_for(Speeds(0.1, 1, PLANNED), 20.0) == 16          # never below 16


def test_measured_speeds_replace_the_plan_and_say_so() -> None:
    assert measured_speeds([], SLOW_CPU) is SLOW_CPU
    short = TurnStats(evaluated_tokens=5, prompt_eval_s=0.01)  # too short to tell
    assert measured_speeds([short], SLOW_CPU) is SLOW_CPU
    text = TurnStats(evaluated_tokens=100, prompt_eval_s=10.0)
    speeds = measured_speeds([text, short], SLOW_CPU)
    assert speeds == Speeds(10.0, 10.0 * 40 / 6, MEASURED)  # encoding scaled by the plan
    image = TurnStats(evaluated_tokens=351, images_encoded=1, image_tokens_encoded=341,
                      image_encode_s=8.5, prompt_eval_s=8.5 + 58.5)
    speeds = measured_speeds([text, image], SLOW_CPU)
    assert speeds is not None
    assert speeds.prompt_tps == pytest.approx(6.0) and speeds.image_tps == pytest.approx(
        341 / 8.5) and speeds.source == MEASURED


def test_image_limit_follows_the_policy() -> None:
    assert image_limit(ImagePolicy(), SLOW_CPU) is None                  # GPU: full size
    assert image_limit(ImagePolicy(max_tokens=200, auto=True), SLOW_CPU) == 200
    assert image_limit(ImagePolicy(auto=True), SLOW_CPU) == budget_for(SLOW_CPU, 20.0)
    assert image_limit(ImagePolicy(auto=True), None) is None


def test_cost_notes(make_image) -> None:
    path = make_image("photo.png", 504, 504)
    full = prepare_image(path)
    note = cost_note(full, SLOW_CPU, automatic=False)
    assert note.startswith("This image is 341 tokens: about 65 s to read here "
                           "(prompt 6.0 tok/s, the plan's estimate).")
    assert f"/image --tokens {budget_for(SLOW_CPU, 20.0)} {path}" in note
    small = prepare_image(path, max_tokens=budget_for(SLOW_CPU, 20.0))
    auto = cost_note(small, SLOW_CPU, automatic=True)
    assert f"photo.png is scaled to {small.n_tokens} tokens (from 341)" in auto
    assert f"/image --tokens 341 {path}" in auto
    assert cost_note(full, Speeds(2000, 2000, MEASURED), automatic=False) == ""  # quick
    assert cost_note(full, None, automatic=False) == ""


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
                       images=ImagePolicy(auto=True, planned=SLOW_CPU))


def test_a_cpu_session_scales_images_to_its_budget_and_says_so(cpu_session: ChatSession,
                                                                make_image) -> None:
    path = make_image("photo.png", 504, 504)
    result = cpu_session.handle(f"/image {path}")
    assert not isinstance(result, Reply) and result is not None
    budget = budget_for(SLOW_CPU, 20.0)
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
