"""Steering fields: validation names the field and the limit; the salt separates steering."""

from __future__ import annotations

import math

import pytest

from flas_vllm.core.errors import SteeringParamError
from flas_vllm.core.steering import Steering, cache_salt, parse_steering, steering


def test_helper_builds_extra_args():
    assert steering("pirates", 1.5) == {"flas_concept": "pirates", "flas_flowtime": 1.5}


def test_unsteered_forms():
    assert parse_steering(None) is None
    assert parse_steering({}) is None
    assert parse_steering({"other_key": 1}) is None
    assert parse_steering(steering("pirates", 0.0)) is None  # T = 0 is served as unsteered
    assert parse_steering(steering("pirates", 2)) == Steering("pirates", 2.0)


@pytest.mark.parametrize(
    "extra, field, words",
    [
        (steering("x", math.nan), "flas_flowtime", "finite"),
        (steering("x", math.inf), "flas_flowtime", "finite"),
        (steering("x", -0.5), "flas_flowtime", "[0, 8.0]"),
        (steering("x", 8.5), "flas_flowtime", "max_flowtime"),
        (steering("x", "1.0"), "flas_flowtime", "number"),
        (steering("x", True), "flas_flowtime", "number"),
        (steering("", 1.0), "flas_concept", "non-empty"),
        (steering("   ", 1.0), "flas_concept", "non-empty"),
        (steering(42, 1.0), "flas_concept", "string"),
        (steering("é" * 1025, 1.0), "flas_concept", "2048 bytes"),
        ({"flas_concept": "x", "flas_flowtime": 1.0, "flas_strength": 2}, "flas_strength", "unknown"),
        ({"flas_concept": "x"}, "flas_flowtime", "required"),
        ({"flas_flowtime": 1.0}, "flas_concept", "required"),
        (steering("x", 1.0, n_steps=0), "flas_n_steps", "[1, 4]"),
        (steering("x", 1.0, n_steps=5), "flas_n_steps", "max_n_steps"),
        (steering("x", 1.0, n_steps=2.0), "flas_n_steps", "integer"),
        (steering("x", 1.0, n_steps="2"), "flas_n_steps", "integer"),
        (steering("x", 1.0, n_steps=True), "flas_n_steps", "integer"),
        ({"flas_n_steps": 2}, "flas_n_steps", "needs flas_concept"),
        (steering("x", 1.0, stop_rule="eos"), "flas_stop_rule", "original"),
        ({"flas_stop_rule": None}, "flas_stop_rule", "vllm, original"),
    ],
)
def test_invalid_fields_name_the_field_and_limit(extra, field, words):
    with pytest.raises(SteeringParamError) as info:
        parse_steering(extra, max_n_steps=4)
    assert info.value.field == field
    assert field in str(info.value) and words in str(info.value)


def test_per_request_n_steps_and_stop_rule():
    assert parse_steering(steering("x", 1.0, n_steps=4), max_n_steps=4) == Steering("x", 1.0, 4)
    assert parse_steering(steering("x", 1.0, n_steps=1), max_n_steps=4).n_steps == 1
    assert parse_steering(steering("x", 1.0)).n_steps is None  # the engine's default
    assert parse_steering(steering("x", 0.0, n_steps=2), max_n_steps=4) is None  # T = 0: unsteered
    assert parse_steering({"flas_stop_rule": "original"}) is None  # a stop rule alone: unsteered
    assert parse_steering(steering("x", 1.0, stop_rule="original")) == Steering("x", 1.0)


def test_limits_are_configurable():
    assert parse_steering(steering("x", 11.0), max_flowtime=12.0) == Steering("x", 11.0)
    with pytest.raises(SteeringParamError, match="10 bytes"):
        parse_steering(steering("x" * 11, 1.0), max_concept_bytes=10)


def test_cache_salt_separates_everything_that_changes_kv():
    base = dict(n_steps=3, fingerprint="abc", user_salt=None)
    s = cache_salt(Steering("a", 1.0), **base)
    assert s == cache_salt(Steering("a", 1.0), **base)
    assert s != cache_salt(Steering("b", 1.0), **base)
    assert s != cache_salt(Steering("a", 1.5), **base)
    assert s != cache_salt(Steering("a", 1.0), **{**base, "n_steps": 2})
    assert s != cache_salt(Steering("a", 1.0), **{**base, "fingerprint": "abd"})
    salted = cache_salt(Steering("a", 1.0), **{**base, "user_salt": "tenant-A"})
    assert salted.startswith("tenant-A|") and salted != s


def test_the_record_crosses_the_process_boundary_as_its_wire_form():
    from flas_vllm.core.steering import WIRE_KEY

    steer = Steering("pirates", 1.5, n_steps=3)
    wire = steer.to_wire()
    assert wire == {"concept": "pirates", "flowtime": 1.5, "n_steps": 3}
    assert Steering.from_wire(wire) == steer
    assert Steering.from_wire({}) is None  # a validated unsteered request
    assert Steering.from_request({"flas_concept": "ignored", WIRE_KEY: wire}) == steer  # the wire form wins
    assert Steering.from_request({WIRE_KEY: {}}) is None
    assert Steering.from_request(None) is None and Steering.from_request({"other": 1}) is None
    with pytest.raises(SteeringParamError) as info:  # flas_* fields the front end never saw
        Steering.from_request(steering("pirates", 1.0))
    assert info.value.field == "flas_concept" and "front end" in str(info.value)
    with pytest.raises(SteeringParamError, match="malformed"):
        Steering.from_request({WIRE_KEY: ["pirates", 1.0]})


def test_field_validators_name_the_field_they_are_given():
    from flas_vllm.core.steering import check_concept, check_flowtime, check_n_steps

    assert check_flowtime(2, 8.0) == 2.0
    with pytest.raises(SteeringParamError, match=r"^flowtime: must be within \[0, 3\] \(max_flowtime\)"):
        check_flowtime(3.5, 3, field="flowtime")
    with pytest.raises(SteeringParamError, match=r"^concepts\[2\]: is 11 bytes long; the limit is 10 bytes"):
        check_concept("x" * 11, 10, field="concepts[2]")
    assert check_concept("pirates", 10) == "pirates"
    with pytest.raises(SteeringParamError, match=r"^flas_n_steps: must be within \[1, 2\]"):
        check_n_steps(3, 2)


def test_engine_options_are_parsed_once_per_process_and_refused_as_config_errors():
    from flas_vllm.core.config import FlasEngineOptions
    from flas_vllm.core.errors import FlasConfigError

    first = FlasEngineOptions.from_mapping({"checkpoint": "c", "max_concepts": 4})
    assert FlasEngineOptions.from_mapping({"max_concepts": 4, "checkpoint": "c"}) is first  # cached
    assert FlasEngineOptions.from_mapping({"checkpoint": "c", "graph_path": True}).graph_path is True
    assert FlasEngineOptions.from_mapping({"checkpoint": "c"}).flow_graphs == "traced"
    assert FlasEngineOptions.from_mapping({"checkpoint": "c", "flow_graphs": "bucketed"}).flow_graphs == "bucketed"
    with pytest.raises(FlasConfigError, match="flow_graphs must be one of 'traced', 'bucketed', got 'buckets'"):
        FlasEngineOptions.from_mapping({"checkpoint": "c", "flow_graphs": "buckets"})
    with pytest.raises(FlasConfigError, match="graph_path must be a boolean, got 1"):  # 1 == True, not alike
        FlasEngineOptions.from_mapping({"checkpoint": "c", "graph_path": 1})
    with pytest.raises(FlasConfigError, match="max_concepts must be an integer >= 1, got 0"):
        FlasEngineOptions.from_mapping({"checkpoint": "c", "max_concepts": 0})
    with pytest.raises(FlasConfigError, match="unknown option 'bogus'"):
        FlasEngineOptions.from_mapping({"checkpoint": "c", "bogus": [1]})  # unhashable: parsed uncached
    with pytest.raises(FlasConfigError, match="max_n_steps = 2 is below the default n_steps = 3"):
        FlasEngineOptions.from_mapping({"checkpoint": "c", "max_n_steps": 2}).step_limits(3)
