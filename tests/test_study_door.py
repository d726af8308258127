"""The study's door (quamba.study.check_study, run by rules/common.smk before any job):
every malformed study fails there with one short ConfigError naming its key, never with another
exception, a crash inside a job, or a long wait."""

import copy
import math
import re
import time

import pytest
import yaml
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quamba.errors import QuambaError
from quamba.study import check_study


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
    (lambda c: c["calibrations"]["default"].update(samples=10**6), "calibrations.default.samples: 1000000 samples, "
                                                                    "one per row, but"),
    (lambda c: c["calibrations"]["default"].update(activation_layers=[0, 40]),
     "calibrations.default: activation_layers: layer 40 does not exist; the model has layers 0..5"),
    (lambda c: c["models"]["mamba1-demo"].update(source="random:mamba-130m:0:2") or
     c["calibrations"]["default"].update(activation_layers=[2]), "models.mamba1-demo (random:mamba-130m:0:2): "
                                                                 "calibrations.default: activation_layers: layer 2"),
    (lambda c: c["gptq"].update(group_size=96), "group_size: 96 does not divide the 128 inputs"),
    (lambda c: c.update(jobs_per_gpu=0), "config.jobs_per_gpu"),
    (lambda c: c.update(jobs_per_gpu=1.5), "config.jobs_per_gpu"),
])
def test_settings_a_job_would_refuse_fail_at_the_door(change, message):
    config = valid_study()
    change(config)
    with pytest.raises(QuambaError, match=re.escape(message)):
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


@pytest.fixture(scope="module")
def task_index():
    """lm-eval's task index, built once per process (seconds): an unknown task name reads it."""
    from quamba.stages.evaluate import task_manager

    with pytest.raises(QuambaError):
        task_manager(["no_such_task"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(config=malformed())
def test_a_malformed_study_fails_at_the_door_or_is_a_valid_one(task_index, config):
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


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    from quamba.formats.study import read_study_file

    bad = tmp_path / "study.yaml"
    bad.write_text("models:\n  a: {source: x\ntasks: [\n")
    with pytest.raises(QuambaError, match=rf"^{bad}:3:6: not valid YAML: expected ',' or '}}'"):
        read_study_file(bad)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(QuambaError, match="list.yaml: a study file is a mapping"):
        read_study_file(tmp_path / "list.yaml")


def test_check_study_runs_the_door_on_layered_files(tmp_path, capsys):
    from quamba.cli import main

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(valid_study()))
    (tmp_path / "more.yaml").write_text("quantization: {alphas: [1.0]}\n")
    assert main(["check-study", str(tmp_path / "base.yaml"), str(tmp_path / "more.yaml")]) == 0
    assert "alphas [1.0]" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text("gptq: {percdamp: .nan}\n")
    assert main(["check-study", str(tmp_path / "base.yaml"), str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "quamba check-study: error: config.gptq.percdamp: nan is not a finite number; NaN and infinity " \
                  "are not allowed anywhere in a study"


@pytest.mark.parametrize("argv, message", [
    (["gptq", "DIR", "--out", "OUT", "--seed", "-1"], "seed: must be an integer >= 0, got -1"),
    (["view", "DIR", "--alphas", "0.999", "0.999"], "alphas: [0.999, 0.999]; allowed: distinct numbers in (0, 1]"),
    (["view", "DIR", "--alphas", "nan"], "alphas: [nan]; allowed: distinct numbers in (0, 1]"),
])
def test_the_cli_meets_the_checks_a_study_meets(tmp_path, capsys, argv, message):
    from quamba.cli import main

    argv = [str(tmp_path / a) if a in ("DIR", "OUT") else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "OUT").exists()
