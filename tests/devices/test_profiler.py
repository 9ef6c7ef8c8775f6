"""devices/profiler.py with the expert timing handed in, and the timing it is handed."""

from __future__ import annotations

import json
import math
import os

from devices.profiler import REFERENCE, profile


def test_profile_uses_the_expert_timer_it_is_given(tmp_path):
    ref = json.loads(REFERENCE.read_text())
    asked = []

    def timer(model):  # twice the devbox's times: compute_factor 2
        asked.append(model)
        return {k: 2 * v for k, v in ref.items()}

    result = profile(tmp_path, 8 << 20, progress=False, expert_timer=timer)
    assert asked == [None]
    assert math.isclose(result["compute_factor"], 2.0)
    assert all(result[k] == 2 * v for k, v in ref.items())
    assert os.listdir(tmp_path) == []  # the scratch file is gone


def test_profile_with_a_model_times_it_and_the_default_set(tmp_path):
    ref = json.loads(REFERENCE.read_text())
    asked = []

    def timer(model):
        asked.append(model)
        return {"expert_ms.f32_l1.b1": 1.0} if model is not None else dict(ref)

    model = tmp_path / "m.emoe"  # the timer is fake: the profiler never opens it
    (tmp_path / "scratch").mkdir()
    result = profile(tmp_path / "scratch", 8 << 20, model, progress=False, expert_timer=timer)
    assert asked == [model, None]
    assert result["expert_ms.f32_l1.b1"] == 1.0 and math.isclose(result["compute_factor"], 1.0)


def test_expert_times_keys_are_the_reference_keys():
    from edgemoe.kernel_timing import BATCHES, expert_times

    times = expert_times(None, shapes=((64, 128),))
    labels = ["bf16", "int8", "int4", "mwq_l1", "mwq_l2", "mwq_l3"]
    assert sorted(times) == sorted(f"expert_ms.{c}_64x128.b{b}" for c in labels for b in BATCHES)
    assert all(v > 0 for v in times.values())
    ref = json.loads(REFERENCE.read_text())
    assert {k.rsplit("_", 1)[0] for k in ref} <= {  # the same labels as the devbox's file
        f"expert_ms.{c}" for c in labels
    }
