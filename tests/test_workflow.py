"""The Snakemake workflow end to end on a tiny study: outputs, summaries, caching, interruption.

One real run (module fixture `ran_study`) feeds every test here; the caching tests edit the config
and compare the dry-run job list with exactly the jobs the edit must cause. The run is killed
and resumed last, since it changes the outputs.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, random_model
from test_checkpoint import write_state_spaces

import quamba
from quamba.formats import layout
from quamba.formats.calibration import read_stats
from quamba.formats.samples import read_samples
from quamba.models import MambaConfig

TINY = {
    "calibrations": {"quick": {"samples": 4, "seq_len": 32, "activation_layers": [0, 1], "activation_samples": 100}},
    "quantization": {"calibration": "quick", "schemes": ["w8a8", "w4a16"], "alphas": [0.999, 1.0], "seeds": [0, 1]},
    "gptq": {"nsamples": 4, "seqlen": 32},
    "tasks": ["quamba_mc", "perplexity"],
    "eval": {"limit": 5},
}
SUMMARY = ["results/summary/runs.csv", "results/summary/accuracy.csv", "results/summary/aggregate.csv",
           "results/summary/clipping.csv", "results/summary/paired.csv", "results/summary/plots/accuracy_vs_alpha.png",
           "results/summary/plots/clipping_ranges.png", "results/summary/plots/paired_differences.png"]
STUDY_RUNS = [(s, a, seed) for s, a in (("w8a8", 0.999), ("w8a8", 1.0), ("w4a16", None)) for seed in (0, 1)]
ACTIVATION_PLOT = "results/summary/plots/tiny_activations.png"  # it draws every study alpha's thresholds
CALIBRATION = {"results/tiny/calib/quick/stats.json", "results/tiny/calib/quick/calibration.safetensors",
               "results/tiny/calib/quick/activations.npz"}
GPTQ_DIRS = {f"results/tiny/gptq/w{bits}/seed{seed}" for bits in (4, 8) for seed in (0, 1)}


def snakemake(workdir: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--cores", "2", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kwargs)


def planned(workdir: Path, config: dict, sort_keys: bool = True) -> set[str]:
    """The outputs a run with `config` would (re)build, from Snakemake's dry run (nothing runs)."""
    from snakemake.api import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings, SnakemakeApi
    from snakemake.settings.types import Quietness

    path = workdir / f"plan-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=sort_keys))
    updated: list[str] = []
    cwd = Path.cwd()
    try:
        with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
            workflow = api.workflow(resource_settings=ResourceSettings(cores=2), snakefile=REPO / "Snakefile",
                                    config_settings=ConfigSettings(configfiles=[path]), workdir=workdir)
            workflow.dag(DAGSettings()).execute_workflow(executor="dryrun", updated_files=updated)
    finally:
        os.chdir(cwd)
        path.unlink()
    return set(updated)


def tiny_config(source: Path, **changes) -> dict:
    config = json.loads(json.dumps(TINY))  # a deep copy
    config["models"] = {"tiny": {"source": str(source), "tokenizer": str(REPO / "resources" / "tokenizer")}}
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[key] = value
    return config


@pytest.fixture(scope="module")
def ran_study(tmp_path_factory):
    """A workdir where the tiny study (one random model, 2 schemes x 1 alpha x 2 seeds) has run."""
    workdir = tmp_path_factory.mktemp("study")
    source = write_state_spaces(random_model(MambaConfig(d_model=32, n_layer=2, vocab_size=4096)), workdir / "ckpt")
    (workdir / "study.yaml").write_text(yaml.safe_dump(tiny_config(source)))
    run = snakemake(workdir, "--configfile", "study.yaml")
    assert run.returncode == 0, run.stderr
    return workdir, source


def test_study_outputs_exist_and_parse(ran_study):
    workdir, _ = ran_study
    out = workdir / "results" / "tiny" / "fp16" / "model"
    assert json.loads((out / "source.json").read_text())["format"] == "state-spaces"
    assert quamba.load(out, device="cpu").config.d_model == 32
    for log in ("fp16/normalize.log", "calib/quick/calibrate.log", "calib/quick/pa0.999/scales.log",
                "gptq/w4/seed1/gptq.log", "w8a8/pa0.999/seed0/eval/quamba_mc.log", "w4a16/seed0/assemble.log"):
        assert (workdir / "logs" / "tiny" / log).is_file()
    assert (workdir / "benchmarks" / "tiny" / "fp16" / "normalize.tsv").is_file()
    stats = read_stats(workdir / "results" / "tiny" / "calib" / "quick" / "stats.json")
    assert stats["num_samples"] == 4 and stats["min_alpha"] == 0.999 and stats["recipe"]["departures"] == []
    assert stats["seed"] == 0 and stats["activation_layers"] == [0, 1]  # seed: the schema's default
    for alpha in ("0.999", "1.0"):
        scales = json.loads((workdir / "results" / "tiny" / "calib" / "quick" / f"pa{alpha}" / "scales.json").read_text())
        assert scales["alpha"] == float(alpha) and "layer_1.x_proj:input" in scales["taps"]
    with np.load(workdir / "results" / "tiny" / "calib" / "quick" / "activations.npz") as npz:
        assert "layer_0.x_proj:input" in npz.files
    for bits in (8, 4):
        for seed in (0, 1):
            assert (workdir / "results" / "tiny" / "gptq" / f"w{bits}" / f"seed{seed}" / "gptq.safetensors").is_file()
    for scheme, alpha in (("w8a8", 0.999), ("w8a8", 1.0), ("w4a16", None)):
        for seed in (0, 1):
            variant = workdir / "results" / "tiny" / layout.variant(scheme, alpha, seed)
            quant_config = json.loads((variant / "model" / "quant_config.json").read_text())
            assert (quant_config["scheme"], quant_config["alpha"], quant_config["seed"]) == (scheme, alpha, seed)
            made_by = json.loads((variant / "model" / "provenance.json").read_text())["command"]
            assert made_by["rule"] == ("assemble" if alpha else "assemble_weight_only")
            assert made_by["wildcards"]["seed"] == str(seed) and made_by["params"]["recipe"]["module_coverage"] == "quamba"
            assert quamba.load(variant / "model", device="cpu").config.n_layer == 2
            for task in ("quamba_mc", "perplexity"):
                result = json.loads((variant / "eval" / f"{task}.json").read_text())
                assert result["model"]["quant_config"]["scheme"] == scheme and task in result["results"]
    assert not any((workdir / "results" / "tiny" / "w4a16").glob("pa*"))  # w4a16 has no alpha axis
    for path in SUMMARY + ["results/summary/plots/tiny_activations.png"]:
        assert (workdir / path).stat().st_size > 0, path
    assert (workdir / "results" / "summary" / "plots" / "accuracy_vs_alpha.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_numbers_equal_the_eval_jsons(ran_study):
    workdir, _ = ran_study
    summary = workdir / "results" / "summary"
    accuracy = pd.read_csv(summary / "accuracy.csv")
    runs = pd.read_csv(summary / "runs.csv")
    assert len(runs) == 6 and set(runs.scheme) == {"w8a8", "w4a16"} and set(runs.seed) == {0, 1}
    assert runs[runs.scheme == "w4a16"].alpha.isna().all()
    checked = 0
    for row in runs.itertuples():
        eval_dir = workdir / row.eval_dir
        mc = json.loads((eval_dir / "quamba_mc.json").read_text())["results"]["quamba_mc"]
        ppl = json.loads((eval_dir / "perplexity.json").read_text())["results"]["perplexity"]
        assert runs.loc[row.Index, "quamba_mc:acc"] == pytest.approx(mc["acc,none"], abs=1e-9)
        assert runs.loc[row.Index, "perplexity:perplexity"] == pytest.approx(ppl["perplexity,none"], rel=1e-9)
        alpha = None if pd.isna(row.alpha) else row.alpha
        tidy = accuracy[(accuracy.variant == layout.variant(row.scheme, alpha, row.seed)) & (accuracy.task == "quamba_mc")
                        & (accuracy.metric == "acc")]
        assert tidy.value.item() == pytest.approx(mc["acc,none"], abs=1e-9)
        assert tidy.stderr.item() == pytest.approx(mc["acc_stderr,none"], abs=1e-9)
        checked += 1
    assert checked == 6
    aggregate = pd.read_csv(summary / "aggregate.csv")
    w8a8 = aggregate[(aggregate.scheme == "w8a8") & (aggregate.alpha == 0.999) & (aggregate.task == "perplexity")
                     & (aggregate.metric == "perplexity")]
    values = runs[(runs.scheme == "w8a8") & (runs.alpha == 0.999)]["perplexity:perplexity"]
    fp16 = accuracy[(accuracy.scheme == "fp16") & (accuracy.metric == "perplexity")].value.item()
    assert w8a8.n.item() == 2 and w8a8["mean"].item() == pytest.approx(values.mean(), rel=1e-9)
    assert w8a8["std"].item() == pytest.approx(values.std(ddof=1), rel=1e-9)
    assert w8a8.delta_fp16.item() == pytest.approx(values.mean() - fp16, rel=1e-9)
    half = 12.706204736 * values.std(ddof=1) / math.sqrt(2)  # Student t, 1 degree of freedom, 97.5%
    assert w8a8.ci95_high.item() == pytest.approx(values.mean() + half, rel=1e-6)
    paired = pd.read_csv(summary / "paired.csv")
    row = paired[(paired.task == "quamba_mc") & (paired.metric == "acc") & (paired.comparison == "alpha")].iloc[0]
    per_item = {seed: {alpha: read_samples(workdir / "results" / "tiny" / "w8a8" / f"pa{alpha}" / f"seed{seed}" / "eval"
                                           / "quamba_mc.samples.json.gz")["tasks"]["quamba_mc"]["metrics"]["acc,none"]
                       for alpha in ("0.999", "1.0")} for seed in (0, 1)}
    per_seed = [np.mean(per_item[s]["1.0"]) - np.mean(per_item[s]["0.999"]) for s in (0, 1)]
    assert (row.alpha, str(row.baseline), row.seeds, row["items"]) == (1.0, "0.999", 2, 5)
    assert row.difference == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert set(paired.comparison) == {"alpha", "fp16"} and set(paired.task) == {"quamba_mc", "perplexity"}
    clipping = pd.read_csv(summary / "clipping.csv")
    scales = json.loads((workdir / "results" / "tiny" / "calib" / "quick" / "pa0.999" / "scales.json").read_text())
    row = clipping[(clipping.tap == "layer_1.x_proj:input") & (clipping.alpha == 0.999)]
    assert row.clipped_fraction.item() == scales["taps"]["layer_1.x_proj:input"]["clipped_fraction"]
    assert clipping[clipping.tap == "lm_head:input"].layer.isna().all() and clipping.layer.dropna().eq(
        clipping.layer.dropna().round()).all()


def test_compare_prints_the_seed_spread(ran_study, capsys):
    workdir, _ = ran_study
    from quamba.cli import main

    assert main(["compare", str(workdir / "results"), "--task", "perplexity"]) == 0
    table = capsys.readouterr().out
    assert "perplexity perplexity" not in table and "(n=2)" in table and "fp16" in table and "w4a16" in table
    assert "tiny w8a8 alpha 0.999 vs fp16 (perplexity): " in table and "over 2 seeds x 5 items" in table
    assert main(["compare", str(workdir / "results")]) == 0  # no --task: an accuracy task, not perplexity
    table = capsys.readouterr().out
    assert table.startswith("quamba_mc acc:")
    assert "tiny w8a8 alpha 1.0 vs 0.999 (quamba_mc acc): " in table and "2 seeds x 5 items" in table
    assert main(["compare", str(workdir / "results"), "--task", "perplexity", "--effect", "0.5"]) == 0
    assert "seeds would detect 0.50%" in capsys.readouterr().out
    assert main(["compare", str(workdir / "results"), "--effect", "-1"]) == 2
    assert "--effect -1.0 is not allowed; expected a positive number" in capsys.readouterr().err
    assert main(["compare", str(workdir / "results"), "--task", "nope"]) == 2
    assert "--task 'nope' has no results; allowed: ['perplexity', 'quamba_mc']" in capsys.readouterr().err


def variant_outputs(scheme: str, alpha: str | None, seed: int, tasks=("quamba_mc", "perplexity")) -> set[str]:
    variant = f"results/tiny/{layout.variant(scheme, None if alpha is None else float(alpha), seed)}"
    return {f"{variant}/model", *(evaluation(variant, task) for task in tasks for evaluation in (results, items))}


def results(variant: str, task: str) -> str:
    return f"{variant}/eval/{task}.json"


def items(variant: str, task: str) -> str:
    return f"{variant}/eval/{task}.samples.json.gz"


def activation_runs(alphas=("0.999", "1.0"), seeds=(0, 1)) -> set[str]:
    return {path for alpha in alphas for seed in seeds for path in variant_outputs("w8a8", alpha, seed)}


def weight_only_runs(seeds=(0, 1)) -> set[str]:
    return {path for seed in seeds for path in variant_outputs("w4a16", None, seed)}


def scales(*alphas: str) -> set[str]:
    return {f"results/tiny/calib/quick/pa{alpha}/scales.json" for alpha in alphas}


def test_second_run_has_nothing_to_do(ran_study):
    workdir, source = ran_study
    assert planned(workdir, tiny_config(source)) == set()


def test_the_order_of_keys_in_a_config_file_changes_nothing(ran_study):
    workdir, source = ran_study

    def reversed_keys(node):
        return {k: reversed_keys(v) for k, v in reversed(node.items())} if isinstance(node, dict) else node

    assert planned(workdir, reversed_keys(tiny_config(source)), sort_keys=False) == set()


def test_adding_an_alpha_listed_nowhere_runs_only_its_scales_assemblies_and_evals(ran_study):
    workdir, source = ran_study
    plan = planned(workdir, tiny_config(source, quantization__alphas=[0.999, 0.99973, 1.0]))
    # no calibration, no GPTQ, no existing assembly or evaluation, nothing of w4a16 (no alpha axis)
    assert plan == {*SUMMARY, ACTIVATION_PLOT, *scales("0.99973"), *activation_runs(["0.99973"])}


def test_removing_an_alpha_reruns_only_the_summaries(ran_study):
    workdir, source = ran_study
    assert planned(workdir, tiny_config(source, quantization__alphas=[0.999])) == {*SUMMARY, ACTIVATION_PLOT}


def test_an_alpha_below_min_alpha_fails_before_any_job_naming_min_alpha(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path, quantization__alphas=[0.99])))
    run = snakemake(tmp_path, "--configfile", "bad.yaml")
    assert run.returncode != 0 and "quantization.alphas: [0.99] are below calibrations.quick.min_alpha 0.999" in \
        run.stdout + run.stderr
    assert not (tmp_path / "results").exists()


def test_lowering_min_alpha_reruns_the_calibration_and_what_reads_it(ran_study):
    workdir, source = ran_study
    plan = planned(workdir, tiny_config(source, calibrations__quick__min_alpha=0.99))
    assert plan == {*SUMMARY, ACTIVATION_PLOT, *CALIBRATION, *scales("0.999", "1.0"), *activation_runs()}


@pytest.mark.parametrize("option, value, reruns", [
    # what each recipe option names, and nothing else: alpha_one acts only at alpha 1.0
    ("alpha_one", "stream_max", {*scales("1.0"), *activation_runs(["1.0"])}),
    ("calibration_data", "packed", {*CALIBRATION, *scales("0.999", "1.0"), *activation_runs()}),
    ("calibration_order", "seeded", {*CALIBRATION, *scales("0.999", "1.0"), *activation_runs()}),
    ("rotate_residual", False, {*CALIBRATION, *scales("0.999", "1.0"), *GPTQ_DIRS, *activation_runs(),
                                *weight_only_runs()}),
    ("hadamard", "extended", {*CALIBRATION, *scales("0.999", "1.0"), *GPTQ_DIRS, *activation_runs(),
                              *weight_only_runs()}),
])
def test_each_recipe_option_reruns_exactly_what_it_names(ran_study, option, value, reruns):
    workdir, source = ran_study
    plan = planned(workdir, tiny_config(source, recipe={"name": "quamba", option: value}))
    assert plan == {*SUMMARY, ACTIVATION_PLOT, *reruns}  # never the FP16 model or its evaluations


def test_adding_a_seed_adds_only_that_seeds_jobs(ran_study):
    workdir, source = ran_study
    plan = planned(workdir, tiny_config(source, quantization__seeds=[0, 1, 2]))
    expected = {*SUMMARY, "results/tiny/gptq/w8/seed2", "results/tiny/gptq/w4/seed2",
                *activation_runs(seeds=[2]), *weight_only_runs([2])}
    assert plan == expected


def test_changing_the_calibration_sample_count_reruns_calibration_and_what_reads_it(ran_study):
    workdir, source = ran_study
    plan = planned(workdir, tiny_config(source, calibrations__quick__samples=6))
    # every activation-quantized dir carries the stats it was built from; w4a16 reads no statistics
    expected = {*SUMMARY, ACTIVATION_PLOT, *CALIBRATION, *scales("0.999", "1.0"), *activation_runs()}
    assert plan == expected  # GPTQ, w4a16, the FP16 model and its evals stay


def test_an_edited_calibration_and_gptq_text_reruns_both_and_what_reads_them(ran_study):
    """The shipped corpus is the data of both (no data key): a newer file reruns calibration and GPTQ."""
    workdir, source = ran_study
    corpus = REPO / "resources" / "corpus" / "train.txt"
    before = corpus.stat()
    try:
        os.utime(corpus, (before.st_atime, time.time() + 60))
        plan = planned(workdir, tiny_config(source))
    finally:
        os.utime(corpus, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert plan == {*SUMMARY, ACTIVATION_PLOT, *CALIBRATION, *scales("0.999", "1.0"), *GPTQ_DIRS,
                    *activation_runs(), *weight_only_runs()}  # never the FP16 model or its evaluations


def test_adding_a_task_runs_only_the_new_evals(ran_study):
    workdir, source = ran_study
    plan = planned(workdir, tiny_config(source, tasks=["quamba_mc", "perplexity", "quamba_cloze"]))
    variants = ["fp16"] + [layout.variant(*run) for run in STUDY_RUNS]
    assert plan == {*SUMMARY, *(f(f"results/tiny/{v}", "quamba_cloze") for v in variants for f in (results, items))}


def test_changing_the_perplexity_budget_reruns_only_perplexity(ran_study):
    workdir, source = ran_study
    plan = planned(workdir, tiny_config(source, eval={"limit": 5, "perplexity_tokens": 64}))
    variants = ["fp16"] + [layout.variant(*run) for run in STUDY_RUNS]
    assert plan == {*SUMMARY, *(f(f"results/tiny/{v}", "perplexity") for v in variants for f in (results, items))}


def test_a_perplexity_file_task_gets_a_flat_file_name(ran_study):
    workdir, source = ran_study
    text = REPO / "resources" / "corpus" / "valid.txt"
    plan = planned(workdir, tiny_config(source, tasks=["quamba_mc", "perplexity", f"perplexity:{text}"]))
    key = "perplexity_" + str(text).strip("/").replace("/", "_")
    assert f"results/tiny/fp16/eval/{key}.json" in plan
    assert all(path.count("/") == 4 for path in plan if path.startswith("results/tiny/fp16/eval/"))


def test_report_bundles_the_tables_and_plots(ran_study):
    workdir, _ = ran_study
    run = snakemake(workdir, "--configfile", "study.yaml", "--report", "results/report.html")
    assert run.returncode == 0, run.stderr
    html = (workdir / "results" / "report.html").read_text()
    for name in ("runs.csv", "aggregate.csv", "clipping.csv", "paired.csv", "accuracy_vs_alpha.png",
                 "clipping_ranges.png", "paired_differences.png", "tiny_activations.png"):
        assert name in html, name


def test_lint_has_no_findings():
    run = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0 and "Lints for" not in run.stdout + run.stderr, run.stdout + run.stderr


def test_killed_run_leaves_no_corrupt_output_and_resumes(ran_study):
    """SIGKILL the whole run while a new seed's GPTQ works; nothing half-written stays under a
    final name, and the rerun builds exactly what is missing."""
    workdir, source = ran_study
    (workdir / "more.yaml").write_text(yaml.safe_dump(tiny_config(source, quantization__seeds=[0, 1, 3])))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "1", "--configfile", "more.yaml"]
    run = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    log = workdir / "logs" / "tiny" / "gptq" / "w4" / "seed3" / "gptq.log"
    log_w8 = workdir / "logs" / "tiny" / "gptq" / "w8" / "seed3" / "gptq.log"
    deadline = time.monotonic() + 300
    while not (log.exists() or log_w8.exists()) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before it could be killed"
    os.killpg(run.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert planned(workdir, tiny_config(source, quantization__seeds=[0, 1, 3]))  # work was left undone
    for bits in (4, 8):
        gptq = workdir / "results" / "tiny" / "gptq" / f"w{bits}" / "seed3"
        assert not gptq.exists() or (gptq / "gptq.safetensors").is_file()  # absent or whole, never partial
    assert snakemake(workdir, "--configfile", "more.yaml", "--unlock").returncode == 0  # the killed run's lock
    resumed = snakemake(workdir, "--configfile", "more.yaml", "--rerun-incomplete")
    assert resumed.returncode == 0, resumed.stderr
    for scheme, alpha in (("w8a8", 0.999), ("w4a16", None)):
        model_dir = workdir / "results" / "tiny" / layout.variant(scheme, alpha, 3) / "model"
        assert quamba.load(model_dir, device="cpu").config.n_layer == 2
    assert len(pd.read_csv(workdir / "results" / "summary" / "runs.csv")) == 9
    assert planned(workdir, tiny_config(source, quantization__seeds=[0, 1, 3])) == set()


def test_study_with_every_transform_on(tmp_path):
    """rotate_residual + reorder + lm_head GPTQ through the workflow: a Mamba2 model reorders, the
    Mamba1 model of the same study goes without, and every quantized dir records what it got."""
    models = {}
    for name, layer in (("m1", "Mamba1"), ("m2", "Mamba2")):
        config = MambaConfig(d_model=32, n_layer=2, vocab_size=4096, layer=layer,
                             **({"headdim": 16, "d_state": 16} if layer == "Mamba2" else {}))
        source = write_state_spaces(random_model(config), tmp_path / name)
        models[name] = {"source": str(source), "tokenizer": str(REPO / "resources" / "tokenizer")}
    config = tiny_config(tmp_path, quantization__schemes=["w8a8"], quantization__seeds=[0], quantization__alphas=[0.999],
                         tasks=["perplexity"], recipe={"reorder": True, "head_clusters": 2, "channel_clusters": 2,
                                                       "quantize_lm_head": True})
    config["models"] = models
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(tmp_path, "--configfile", "study.yaml")
    assert run.returncode == 0, run.stderr
    for name in models:
        model_dir = tmp_path / "results" / name / "w8a8" / "pa0.999" / "seed0" / "model"
        quant_config = json.loads((model_dir / "quant_config.json").read_text())
        assert quant_config["recipe"]["options"]["rotate_residual"] is True
        assert "lm_head" in quant_config["quantized_linears"]
        assert ("reorder" in quant_config) == (name == "m2")
        ppl = json.loads((model_dir.parent / "eval" / "perplexity.json").read_text())["results"]["perplexity"]
        fp16 = json.loads((tmp_path / "results" / name / "fp16" / "eval" / "perplexity.json").read_text())
        assert ppl["perplexity,none"] == pytest.approx(fp16["results"]["perplexity"]["perplexity,none"], rel=0.05)


@pytest.mark.parametrize("models, message", [
    ({"tiny": {"sorce": "x"}}, "models.tiny: unknown key ['sorce']; allowed keys: source, tokenizer"),
    ({"tiny": {"source": "/no/such/dir"}}, "models.tiny.source: /no/such/dir: no such model directory"),
    ({"bad name!": {"source": "x/y"}}, "does not match"),
    ({}, "should be non-empty"),
])
def test_bad_config_fails_before_any_job_naming_the_key(tmp_path, models, message):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"models": models, "calibrations": {"default": {}},
                                                       "quantization": {}, "gptq": {}}))
    run = snakemake(tmp_path, "--configfile", "bad.yaml")
    assert run.returncode != 0
    assert message in run.stdout + run.stderr
    assert len((run.stdout + run.stderr).splitlines()) < 40  # one short error, never the schema
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("changes, message", [
    ({"quantization__alphas": [0.9995, 1.5]}, "1.5 is greater than the maximum of 1"),
    ({"calibrations__quick__samples": 0}, "0 is less than the minimum of 1"),
    ({"calibrations__quick": {"sample": 8}}, "calibrations.quick: unknown key ['sample']; allowed keys: activation_layers"),
    ({"calibrations__quick": {"alphas": [1.0]}}, "unknown key ['alphas']"),
    ({"recipe": {"alpha_one": "max"}}, "'max' is not one of ['quamba', 'stream_max']"),
    ({"recipe": {"name": "quamba2"}}, "'quamba2' is not one of ['quamba']"),
    ({"recipe": {"hadamard": "sylvester"}}, "'sylvester' is not one of ['quamba', 'extended']"),
    ({"transforms": {"reorder": True}}, "config: unknown key ['transforms']; allowed keys: calibrations"),
    ({"models": {"summary": {"source": "x/y"}}}, "config.models: 'summary' is not allowed here"),
    ({"quantization__schemes": ["w8a4"]}, "'w8a4' is not one of ['w8a8', 'w4a8', 'w4a16']"),
    ({"quantization__seeds": [-1]}, "-1 is less than the minimum of 0"),
    ({"device": "tpu"}, "'tpu' is not one of ['cpu', 'cuda']"),
    ({"tasks": ["quamba_mcc"]}, "task 'quamba_mcc': unknown"),
    ({"eval": {"batch_size": 0}}, "0 is less than the minimum of 1"),
    ({"calibrations__quick__data": "/no/such/calib.txt"}, "config: calibrations.quick.data: /no/such/calib.txt: "
                                                           "no such data file"),
    ({"gptq__data": "missing.jsonl"}, "config: gptq.data: missing.jsonl: no such data file"),
])
def test_bad_study_setting_fails_at_the_door_naming_the_key(tmp_path, changes, message):
    """The door of every study (check_study, which the Snakefile runs first): each case is checked
    in-process here (a Snakemake start-up costs seconds), and three through Snakemake itself below."""
    from quamba.errors import QuambaError
    from quamba.study import check_study

    config = tiny_config(tmp_path, **changes)
    with pytest.raises(QuambaError) as raised:
        check_study(config)
    assert message in str(raised.value)


@pytest.mark.parametrize("changes, message", [
    ({"calibrations__quick__samples": 0}, "0 is less than the minimum of 1"),
    ({"transforms": {"reorder": True}}, "config: unknown key ['transforms']; allowed keys: calibrations"),
    ({"tasks": ["quamba_mcc"]}, "task 'quamba_mcc': unknown"),
])
def test_bad_study_setting_fails_before_any_job(tmp_path, changes, message):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path, **changes)))
    run = snakemake(tmp_path, "--configfile", "bad.yaml")
    assert run.returncode != 0
    assert message in run.stdout + run.stderr
    assert len((run.stdout + run.stderr).splitlines()) < 40  # one short error, never the schema
    assert not (tmp_path / "results").exists()


def test_paper_study_dry_run_lists_the_expected_jobs(tmp_path):
    """configs/paper.yaml needs the hub and a GPU; its DAG is checked without running anything."""
    run = snakemake(tmp_path, "--configfile", str(REPO / "configs" / "paper.yaml"), "-n", "--quiet", "rules")
    assert run.returncode == 0, run.stderr
    counts = {}
    for line in (run.stdout + run.stderr).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    # 2 models; 1 calibration; w8a8 -> GPTQ at 8 bits x 3 seeds; 2 alphas x 3 seeds; fp16 + 6 variants x 1 task
    assert counts == {"normalize_fp16": 2, "calibrate": 2, "scales": 4, "gptq": 6, "assemble": 12, "evaluate": 14,
                      "summarize": 1, "plot_summary": 1, "plot_activations": 2, "all": 1, "total": 45}


def test_realsize_study_dry_run_lists_the_expected_jobs(tmp_path):
    """configs/realsize.yaml names random:ARCH sources: nothing is downloaded, the DAG is the paper's."""
    run = snakemake(tmp_path, "--configfile", str(REPO / "configs" / "realsize.yaml"), "-n", "--quiet", "rules")
    assert run.returncode == 0, run.stderr
    counts = {}
    for line in (run.stdout + run.stderr).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    assert counts == {"normalize_fp16": 2, "calibrate": 2, "scales": 4, "gptq": 6, "assemble": 12, "evaluate": 28,
                      "summarize": 1, "plot_summary": 1, "plot_activations": 2, "all": 1, "total": 59}


@pytest.mark.slow
def test_realsize_study_runs_on_a_cpu_at_one_layer(tmp_path):
    """configs/realsize.yaml's mamba2-2.7b cut to 1 block (random:ARCH:SEED:LAYERS), small windows,
    on the CPU: the real width (2560, 80 heads, 128-state groups, vocab 50277 padded) through every
    stage, and each job's log opens with its start-up. lm_head is left to FP16 here (lm_head_gptq:
    none): its 4-bit GPTQ at this vocabulary is 2.5 minutes of fp16 solve on 2 CPU cores."""
    config = yaml.safe_load((REPO / "configs" / "realsize.yaml").read_text())
    config.update(device="cpu", tasks=["perplexity"], eval={"batch_size": 8, "limit": None, "perplexity_tokens": 256})
    config["recipe"] = {"name": "quamba", "lm_head_gptq": "none"}
    config["models"] = {"mamba2-2.7b": {"source": "random:mamba2-2.7b:0:1"}}
    config["calibrations"]["default"].update(samples=2, seq_len=64)
    config["quantization"].update(schemes=["w8a8", "w4a16"], alphas=[1.0], seeds=[0])
    config["gptq"] = {"nsamples": 2, "seqlen": 64}
    (tmp_path / "resources").symlink_to(REPO / "resources")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(tmp_path, "--configfile", "study.yaml")
    assert run.returncode == 0, run.stderr[-3000:]
    fp16 = json.loads((tmp_path / "results" / "mamba2-2.7b" / "fp16" / "model" / "config.json").read_text())
    assert fp16["d_model"] == 2560 and fp16["n_layer"] == 1
    runs = pd.read_csv(tmp_path / "results" / "summary" / "aggregate.csv")
    ppl = runs[runs.metric == "perplexity"]
    assert set(ppl.scheme) == {"fp16", "w8a8", "w4a16"} and ppl["mean"].map(math.isfinite).all()
    logs = list((tmp_path / "logs").rglob("*.log"))  # every job: normalize ... plots
    assert len(logs) == 13 and all("start-up:" in log.read_text().partition("\n")[0] for log in logs)


def test_a_random_source_names_a_known_architecture(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path, models={"m": {"source": "random:mamba-9b"}})))
    run = snakemake(tmp_path, "--configfile", "bad.yaml")
    assert run.returncode != 0 and "models.m.source" in run.stdout + run.stderr
    assert "'mamba-9b' is not a known architecture; allowed: mamba-130m" in run.stdout + run.stderr


@pytest.mark.slow
def test_default_study_runs_from_a_clean_checkout(tmp_path):
    """`snakemake --cores 2` on config.yaml, in a workdir laid out like a fresh clone."""
    (tmp_path / "resources").symlink_to(REPO / "resources")
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    started = time.monotonic()
    run = snakemake(tmp_path)
    print(f"default study: {time.monotonic() - started:.0f} s")
    assert run.returncode == 0, run.stderr
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    runs = pd.read_csv(tmp_path / "results" / "summary" / "runs.csv")
    q = config["quantization"]
    axes = sum(len(q["alphas"]) if scheme != "w4a16" else 1 for scheme in q["schemes"])  # w4a16: no alpha axis
    assert len(runs) == len(config["models"]) * axes * len(q["seeds"])
    for model in config["models"]:
        assert (tmp_path / "results" / model / "fp16" / "model" / "model.safetensors").is_file()
        for calib in config["calibrations"]:
            read_stats(tmp_path / "results" / model / "calib" / calib / "stats.json")
        for task in config["tasks"]:
            json.loads((tmp_path / "results" / model / "fp16" / "eval" / f"{task}.json").read_text())
