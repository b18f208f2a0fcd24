"""Backend profiles: chosen per (platform, device count), loaded without editing the library,
passed into planning and part of every cached decision's key."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import einmix_jax as em
from einmix_jax import planning

from .cases import CASES, normal, record_executed
from .reference import reference_einmix

TOKEN_MIX = ("b t c -> b u c", "t u", None, dict(t=196, u=256))


@pytest.fixture
def restore_profile():
    """Put the profile in use for this backend back after the test."""
    before = planning.profile()
    yield
    planning.use_profile(before)


def _token_mix():
    pattern, weight, bias, sizes = TOKEN_MIX
    return em.layer(pattern, weight, bias, **sizes)


def test_one_profile_per_platform_and_device_count():
    cpu = planning.profile("cpu", 1)
    assert cpu.platform == "cpu" and cpu.loops and cpu.packs and cpu.w_copy
    assert planning.profile("cpu", 1) is cpu  # chosen once
    several = planning.profile("cpu", 8)
    assert not several.loops and not several.packs and several.seconds == cpu.seconds
    gpu = planning.profile("gpu", 1)
    assert gpu.platform == "gpu" and not gpu.loops and not gpu.w_copy
    assert planning.profile() == planning.profile(jax.default_backend(), jax.device_count())


def test_the_profile_decides_the_candidates():
    layer = _token_mix()
    shape = (64, 196, 512)
    cpu = planning.candidates(layer.plan, shape, profile=planning.profile("cpu", 1))
    gpu = planning.candidates(layer.plan, shape, profile=planning.profile("gpu", 1))
    assert any(c.kind == "loop" for c in cpu)
    assert not any(c.kind == "loop" for c in gpu)
    assert {c.label for c in gpu} < {c.label for c in cpu}
    # the weight copy is a step only where the profile asks for it
    mix_first = em.layer("t b c -> u b c", "t u", t=227, u=200)
    shape = (227, 128, 1024)
    low_cpu = planning.lower(mix_first.plan, shape, profile=planning.profile("cpu", 1))
    low_gpu = planning.lower(mix_first.plan, shape, profile=planning.profile("gpu", 1))
    assert low_cpu.strategy == "w first" and low_cpu.w_copy  # departs: predicted 1.4x faster
    assert low_gpu.strategy in ("as einsum", "x first") and not low_gpu.w_copy


def test_json_round_trip_and_errors_name_the_field(tmp_path):
    p = planning.XLA_CPU
    assert planning.Profile.from_json(p.to_json()) == p
    fields = json.loads(p.to_json())
    del fields["seconds"]["flop"]
    with pytest.raises(em.EinMixError, match="flop"):
        planning.Profile.from_dict(fields)
    with pytest.raises(em.EinMixError, match="colour"):
        planning.Profile.from_dict({**json.loads(p.to_json()), "colour": "red"})
    with pytest.raises(em.EinMixError, match="JSON"):
        planning.Profile.from_json("{not json")
    negative = json.loads(p.to_json())
    negative["seconds"]["flop"] = -1.0
    with pytest.raises(em.EinMixError, match=">= 0"):
        planning.Profile.from_dict(negative)
    with pytest.raises(em.EinMixError, match="Profile"):
        planning.use_profile({"name": "a dict"})


def test_a_loaded_profile_changes_decisions_and_the_cache_follows(
    tmp_path, monkeypatch, restore_profile
):
    layer = _token_mix()
    shape = (64, 196, 512)
    before = planning.lower(layer.plan, shape)
    # moving elements free, FLOPs dear: the broadcast weight (no transposes) loses its edge
    seconds = dict(planning.profile().seconds)
    seconds.update({"moved element": 0.0, "loop step": 0.0, "loop element": 0.0})
    fields = {**json.loads(planning.profile().to_json()), "seconds": seconds, "name": "mine"}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(fields))
    loaded = planning.load_profile(path)
    assert planning.profile().name == "mine" and loaded == planning.profile()
    after = planning.lower(layer.plan, shape)
    expected = planning.build(
        layer.plan, shape, planning.choose(planning.candidates(layer.plan, shape, profile=loaded))
    )
    assert after == expected
    assert after != before  # not the cached decision of the other profile
    # and the functional apply runs the new decision, still computing EinMix
    ran = record_executed(monkeypatch)
    x = normal((2, 196, 8))
    params = layer.init(jax.random.key(0))
    y = layer(params, x)
    small = planning.lower(layer.plan, x.shape)
    assert ran == [small]
    w = np.asarray(params["weight"])
    expected_y = reference_einmix("b t c -> b u c", "t u", None, x, w, None, dict(t=196, u=256))
    np.testing.assert_allclose(y, expected_y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_unmeasured_accelerator_keeps_xla_s_own_lowering(name, monkeypatch, restore_profile):
    # the profile a GPU or TPU gets until someone fits one, run here on the CPU
    case = CASES[name]
    params, layer = case.init(jax.random.key(0))
    gpu = planning.profile("gpu", 1)
    choices = planning.candidates(layer.plan, case.x_shape, profile=gpu)
    assert choices[0].kind == "as einsum"  # always a candidate, first
    assert not {"loop", "block-diagonal"} & {c.kind for c in choices}
    chosen = planning.choose(choices)
    # XLA's lowering: N-d as given, or its canonical GEMM form with no outer axes
    assert chosen.kind in ("as einsum", "x first") and "broadcast" not in chosen.label
    assert chosen.kind == "as einsum" or chosen.cost < choices[0].cost
    planning.use_profile(dataclasses.replace(gpu, platform=jax.default_backend()))
    ran = record_executed(monkeypatch)
    x = normal(case.x_shape)
    y = layer(params, x)
    assert ran == [planning.build(layer.plan, case.x_shape, chosen)]
    np.testing.assert_allclose(y, case.reference(params, x), rtol=1e-4, atol=1e-4)
