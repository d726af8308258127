"""The study's door (quamba.formats.study.check_study, run by rules/common.smk before any job):
every malformed study fails there with one short ConfigError naming its key, never with another
exception, a crash inside a job, or a long wait."""

import copy
import math
import time

import pytest
import yaml
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quamba.errors import QuambaError
from quamba.formats.study import check_study


def valid_study() -> dict:
    """config.yaml with its shipped paths made absolute (the door checks that sources exist)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for spec in config["models"].values():
        for key in ("source", "tokenizer"):
            if key in spec and not spec[key].startswith("random:"):
                spec[key] = str(REPO / spec[key])
    return config


def test_the_default_study_passes_and_gets_the_schema_defaults():
    config = valid_study()
    check_study(config)
    assert config["calibrations"]["default"]["min_alpha"] == 0.999 and "device" in config


@pytest.mark.parametrize("path, value", [
    (("quantization", "alphas", 0), math.nan),
    (("calibrations", "default", "min_alpha"), math.nan),
    (("gptq", "percdamp"), math.inf),
    (("quantization", "alphas", 1), -math.inf),
])
def test_a_non_finite_number_anywhere_fails_naming_its_path(path, value):
    config = valid_study()
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(QuambaError, match=r"config\." + r"\.".join(map(str, path)) + ": .* is not a finite number"):
        check_study(config)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["gptq"].update(percdamp=1.5), "config.gptq.percdamp"),
    (lambda c: c["gptq"].update(nsamples=0), "config.gptq.nsamples"),
    (lambda c: c["calibrations"]["default"].update(activation_layers=[-1]), "activation_layers"),
    (lambda c: c["quantization"].update(calibration="nope"), "quantization.calibration: 'nope'"),
    (lambda c: c["quantization"].update(alphas=[0.99]), "below calibrations.default.min_alpha"),
    (lambda c: c["calibrations"]["default"].update(batch_size=4), "batch_size: 4 with recipe.calibration_data rows"),
])
def test_settings_a_job_would_refuse_fail_at_the_door(change, message):
    config = valid_study()
    change(config)
    with pytest.raises(QuambaError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_study(config)


def _paths(node, prefix=()):
    """Every path into a parsed YAML document (dict keys and list indices), the root included."""
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _paths(child, (*prefix, key))


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                 st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
PATHS = list(_paths(valid_study()))


@st.composite
def malformed(draw):
    """The default study with one part broken: a value replaced by junk, a key dropped, or an
    unknown key added."""
    config = valid_study()
    path = draw(st.sampled_from(PATHS[1:]))
    node = config
    for key in path[:-1]:
        node = node[key]
    action = draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "replace":
        node[path[-1]] = draw(JUNK)
    elif action == "drop" and isinstance(node, dict):
        del node[path[-1]]
    else:
        target = node[path[-1]] if isinstance(node[path[-1]], dict) else node if isinstance(node, dict) else config
        target[draw(st.sampled_from(["sorce", "alpha", "sample", "x"]))] = draw(JUNK)
    return config


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(malformed())
def test_a_malformed_study_fails_at_the_door_or_is_a_valid_one(config):
    original = copy.deepcopy(config)
    start = time.perf_counter()
    try:
        check_study(config)
    except QuambaError as err:  # the only way it may fail: one short line naming the key
        message = str(err)
        assert message.startswith("config") and "\n" not in message and len(message) < 600, message
    else:  # it passed: then it was a study whose jobs accept every setting, door and all
        assert not any(isinstance(v, float) and not math.isfinite(v) for v in _leaves(original))
        again = copy.deepcopy(original)
        check_study(again)
        assert again == config
    assert time.perf_counter() - start < 2.0


def _leaves(node):
    if isinstance(node, dict):
        for child in node.values():
            yield from _leaves(child)
    elif isinstance(node, list):
        for child in node:
            yield from _leaves(child)
    else:
        yield node
