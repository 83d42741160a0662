"""Issue 12's calibration as a source of an image turn's costs (runtime.calibrated_speeds):
after this chat's own and an earlier session's measurements, before the plan's estimate."""

from __future__ import annotations

from dataclasses import replace

import pytest

from localsmall.chat.speeds import CALIBRATED, MEASURED, PLANNED, STORED
from localsmall.engine.model import Engine
from localsmall.models.resolve import LocalBuild
from localsmall.plan.hardware import detect
from localsmall.plan.speed_cache import save_calibration
from localsmall.runtime import speed_memory
from localsmall.runtime.speeds import machine_key
from localsmall.runtime.start import image_policy
from tests.test_speed import simulated_calibration


@pytest.fixture
def build(tiny) -> LocalBuild:
    return LocalBuild(model_path=tiny.f16, mmproj_path=tiny.mmproj, model=None, quant=None,
                      label="tiny")


def test_source_order_measured_stored_calibrated_planned(engine: Engine, build) -> None:
    hardware = detect()
    assert image_policy(engine, build, hardware=hardware).base.source == PLANNED
    key = machine_key(hardware, engine.n_threads)
    save_calibration(simulated_calibration(key))
    calibrated = image_policy(engine, build, hardware=hardware).base
    assert calibrated.source == CALIBRATED and calibrated.valid()
    assert "this machine's calibration" in calibrated.describe()
    # A machine twice as slow by its calibration: every reading cost twice as long.
    save_calibration(replace(simulated_calibration(key, slower=2.0), created="2026-02-01"))
    slower = image_policy(engine, build, hardware=hardware).base
    assert slower.batch_s == pytest.approx(2 * calibrated.batch_s)
    assert slower.token_s == pytest.approx(2 * calibrated.token_s)
    assert slower.encode_token_s == pytest.approx(2 * calibrated.encode_token_s)
    # Speeds measured in an earlier session on this machine come first.
    policy = image_policy(engine, build, hardware=hardware)
    assert policy.remember is not None
    policy.remember(calibrated.scaled(3, MEASURED))
    assert image_policy(engine, build, hardware=hardware).base.source == STORED
    where = speed_memory.memory_path(model=build.model_path, mmproj=build.mmproj_path,
                                     n_threads=engine.n_threads, cpu=hardware.cpu.model)
    assert speed_memory.recall(where) is not None
