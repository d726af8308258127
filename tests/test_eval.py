"""Evaluation: the `quamba` lm-eval adapter scores exactly as lm-eval's own HFLM does on the same
weights, and `evaluate` writes one deterministic results JSON or fails before any model work."""

import json
import math
import shutil

import pytest
import torch
from conftest import REPO, random_model
from lm_eval.api.instance import Instance
from lm_eval.evaluator import simple_evaluate
from test_checkpoint import write_state_spaces
from test_models import to_transformers

import quamba.lm_eval_model
import quamba.stages.evaluate as qeval
from quamba import perplexity
from quamba.errors import CheckpointError, ConfigError
from quamba.formats.quantized_dir import QUANT_CONFIG_VERSION
from quamba.formats.samples import read_samples, samples_path
from quamba.io import sha256_files
from quamba.lm_eval_model import QuambaLM
from quamba.models import MambaConfig
from quamba.stages.evaluate import evaluate, task_manager

TOKENIZER = REPO / "resources" / "tokenizer"
TASK_DATA = REPO / "resources" / "tasks" / "data"
DEMOS = {name: REPO / "resources" / "models" / name for name in ("mamba1-demo", "mamba2-demo")}
# Small enough that long cloze passages and documents are truncated / split into rolling windows.
MAX_LENGTH = 96
LAYERS = {
    "Mamba1": MambaConfig(d_model=32, n_layer=2, vocab_size=4096),
    "Mamba2": MambaConfig(d_model=32, n_layer=2, vocab_size=4096, layer="Mamba2", d_state=16, headdim=16,
                          chunk_size=16),
}


def with_tokenizer(model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, model_dir / name)
    return model_dir


@pytest.fixture(scope="module", params=sorted(LAYERS))
def dirs(request, tmp_path_factory):
    """The same fp32 weights twice: our state-spaces dir, and transformers' format for HFLM."""
    tmp = tmp_path_factory.mktemp(request.param)
    model = random_model(LAYERS[request.param])
    ours = with_tokenizer(write_state_spaces(model, tmp / "ours", "model.safetensors"))
    to_transformers(model).save_pretrained(tmp / "hf")
    return ours, with_tokenizer(tmp / "hf")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """One fp32 model dir, for behaviour that does not depend on the layer type."""
    model = random_model(LAYERS["Mamba1"])
    return with_tokenizer(write_state_spaces(model, tmp_path_factory.mktemp("one") / "m", "model.safetensors"))


@pytest.fixture(scope="module")
def ours(dirs):
    return QuambaLM(dirs[0], batch_size=8, device="cpu", max_length=MAX_LENGTH, progress=False)


@pytest.fixture(scope="module")
def theirs(dirs):
    """lm-eval's own HF model on the same weights: the reference."""
    pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate (the `test` extra)")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(dirs[1]), backend="causal", device="cpu", dtype="float32", batch_size=8,
                max_length=MAX_LENGTH)


def jsonl(name, n):
    lines = (TASK_DATA / name).read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def loglikelihood_requests():
    """Cloze and multiple-choice pairs as the tasks build them, plus the boundary cases."""
    pairs = [(doc["context"], doc["target"]) for doc in jsonl("quamba_cloze.jsonl", 12)]
    pairs += [(doc["context"], " " + choice) for doc in jsonl("quamba_mc.jsonl", 4) for choice in doc["choices"]]
    pairs += [("", "Hello world"),            # empty context: conditioned on the prefix token
              ("Return the value ", "of x."),  # trailing space moves into the continuation
              ("word " * 200, "end")]          # longer than max_length: truncated on the left
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def test_loglikelihood_equals_hflm_per_request(ours, theirs):
    greedy = [(context, ours.tok_decode(ours.greedy(ours.tok_encode(context), 3)))
              for context in ("The module provides", "Return the", "If the")]
    requests = loglikelihood_requests() + [Instance("loglikelihood", {}, pair, 0) for pair in greedy]
    got, want = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in want]
    assert any(greedy for _, greedy in got[-3:]), "some continuations should be the greedy ones"
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) <= 1e-4


def test_context_and_continuation_tokens_are_hflms(ours, theirs, monkeypatch):
    requests = loglikelihood_requests() + [Instance("loglikelihood", {}, ("", "<|endoftext|>Hi"), 0)]
    built = {"ours": [], "theirs": []}  # what each loglikelihood hands its scorer: (pair, context, continuation)
    for name, lm in (("ours", ours), ("theirs", theirs)):
        monkeypatch.setattr(lm, "_loglikelihood_tokens",
                            lambda reqs, name=name, **_: built[name].extend(reqs) or [(0.0, False)] * len(reqs))
        lm.loglikelihood(requests)
    assert built["ours"] == built["theirs"] and len(built["ours"]) == len(requests)


def test_edge_requests_score_as_hflm_and_a_whitespace_context_as_an_empty_one(ours, theirs):
    pairs = [("", "Hello world"), ("The value", " of x"), ("x " * 400, " end"), ("Return the value ", "of x.")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got, want = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) <= 1e-4
    # "\n" moves into the continuation, leaving an empty context: lm-eval's empty-context rule
    # (HFLM 0.4.13 asserts on it); the score equals HFLM's for the empty context it became
    [(whitespace, _)] = ours.loglikelihood([Instance("loglikelihood", {}, ("\n", "Hello world"), 0)])
    [(empty, _)] = theirs.loglikelihood([Instance("loglikelihood", {}, ("", "\nHello world"), 0)])
    assert math.isfinite(whitespace) and abs(whitespace - empty) <= 1e-4
    with pytest.raises(ValueError, match="a continuation of .* tokens exceeds max_length=96"):
        ours.loglikelihood([Instance("loglikelihood", {}, ("a", " word" * 200), 0)])


def test_loglikelihood_rolling_equals_hflm(ours, theirs):
    text = (REPO / "resources" / "corpus" / "test.txt").read_text()
    docs = ["a b", text[:300], text[300:4000]]
    requests = [Instance("loglikelihood_rolling", {}, (doc,), i) for i, doc in enumerate(docs)]
    got, want = ours.loglikelihood_rolling(requests), theirs.loglikelihood_rolling(requests)
    assert len(ours.tok_encode(docs[2])) > 5 * MAX_LENGTH, "a document should span several windows"
    # Each sum runs over hundreds of float32 token log-probs; HFLM adds them in float32.
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(got, want)), (got, want)


def test_task_metrics_and_samples_equal_hflm(ours, theirs):
    manager = task_manager(["quamba_cloze", "quamba_mc"])
    runs = [simple_evaluate(model=lm, tasks=["quamba_cloze", "quamba_mc"], task_manager=manager, limit=30,
                            bootstrap_iters=0) for lm in (ours, theirs)]
    got, want = (run["results"] for run in runs)
    assert got["quamba_mc"]["acc,none"] == want["quamba_mc"]["acc,none"]
    assert got["quamba_mc"]["acc_norm,none"] == want["quamba_mc"]["acc_norm,none"]
    assert got["quamba_cloze"]["acc,none"] == want["quamba_cloze"]["acc,none"]
    assert got["quamba_cloze"]["perplexity,none"] == pytest.approx(want["quamba_cloze"]["perplexity,none"], rel=1e-6)
    for task in ("quamba_cloze", "quamba_mc"):
        ours_resps = [r for sample in runs[0]["samples"][task] for r in sample["filtered_resps"]]
        hf_resps = [r for sample in runs[1]["samples"][task] for r in sample["filtered_resps"]]
        assert len(ours_resps) == len(hf_resps) > 0
        assert max(abs(float(a[0]) - float(b[0])) for a, b in zip(ours_resps, hf_resps)) <= 1e-4


def test_an_fp16_model_is_scored_in_fp16_as_hflm_unless_softmax_dtype_says_float32(dirs):
    """HFLM (Quamba's wrapper subclasses it) takes the log-softmax in the logits' dtype and sums a
    continuation's log-probabilities in it: fp16 on Quamba's fp16 model. softmax_dtype float32 is
    the finer departure, named."""
    requests = [(None, [5, 17, 99, 3, 250], [7, 8, 9, 10]), (None, [1, 2], [300, 301, 302, 303, 304, 305])]
    for softmax_dtype, dtype in ((None, torch.float16), ("float32", torch.float32)):
        lm = QuambaLM(dirs[0], batch_size=2, device="cpu", dtype="float16", progress=False, softmax_dtype=softmax_dtype)
        got = lm._loglikelihood_tokens(requests)
        for (_, context, continuation), (score, _) in zip(requests, got):
            row = context + continuation
            with torch.no_grad():
                logprobs = lm.logits([row])[0].log_softmax(dim=-1, dtype=dtype)  # (l, vocab)
            positions = range(len(context) - 1, len(row) - 1)
            want = logprobs[list(positions), continuation]
            assert want.dtype == dtype and score == float(want.sum())


def test_batched_and_unbatched_scores_agree(dirs, ours):
    single = QuambaLM(dirs[0], batch_size=1, device="cpu", max_length=MAX_LENGTH, progress=False)
    requests = loglikelihood_requests()
    got, want = ours.loglikelihood(requests), single.loglikelihood(requests)
    assert [g for _, g in got] == [g for _, g in want]
    # Right padding never changes a causal model's earlier positions; only the matmul's batch
    # shape differs, which on CPU moves a float32 result (a float32 sum, as HFLM's) by a few ulps.
    assert max(abs(a - b) / max(1.0, abs(b)) for (a, _), (b, _) in zip(got, want)) <= 1e-6
    again = single.loglikelihood(requests)  # past its first batch (read back at once, timed) nothing changes
    assert again == want and 0 < single.first_batch_seconds <= single.scoring_seconds


def test_scores_taken_in_chunks_of_target_rows_are_the_whole_batchs_bit_for_bit(ours, monkeypatch):
    """SCORED_ROWS bounds the float32 log-softmax held at once (a 64 x 2048 perplexity batch: 26 GB
    whole); chunks that split requests, and a chunk per target, give exactly the whole batch's
    scores: loglikelihood and rolling windows alike."""
    text = (REPO / "resources" / "corpus" / "test.txt").read_text()
    rolling = [Instance("loglikelihood_rolling", {}, (doc,), i) for i, doc in enumerate(["a b", text[:3000]])]
    requests = loglikelihood_requests()
    whole = ours.loglikelihood(requests), ours.loglikelihood_rolling(rolling)
    targets = sum(len(ours.tok_encode(c)) for c in (r.args[1] for r in requests))
    assert targets > 7 * ours.batch_size, "the chunks below should split the batches"
    for rows in (7, 1):
        monkeypatch.setattr(quamba.lm_eval_model, "SCORED_ROWS", rows)
        assert (ours.loglikelihood(requests), ours.loglikelihood_rolling(rolling)) == whole, rows


@torch.no_grad()
def argmax_loop(model, prompt, steps):
    """Greedy decoding the slow way: a full forward over the growing sequence at every step."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_generation_equals_an_argmax_loop(ours):
    prompt = ours.tok_encode("The module provides")
    assert ours.greedy(prompt, 12) == argmax_loop(ours.model, prompt, 12)


def test_generate_until_stops_at_the_stop_string(ours):
    context = "The module provides"
    text = ours.tok_decode(ours.greedy(ours.tok_encode(context), 16))
    stop = text[len(text) // 2:len(text) // 2 + 3]
    request = Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 16}), 0)
    assert ours.generate_until([request]) == [text[:text.index(stop)]]
    capped = Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 5}), 0)
    assert ours.generate_until([capped]) == [ours.tok_decode(ours.greedy(ours.tok_encode(context), 5))]


class PaddedRowsWin(torch.nn.Module):
    """Makes every padded vocabulary row (beyond the tokenizer's 4096 tokens) the argmax."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, ids, cache=None):
        out = self.inner(ids, cache=cache)
        out.logits[..., 4096:] += 1e4
        return out

    def allocate_cache(self, batch_size):
        return self.inner.allocate_cache(batch_size)


def test_generation_never_picks_a_padded_vocabulary_row(tmp_path):
    padded = random_model(MambaConfig(d_model=32, n_layer=1, vocab_size=4100))  # 4104 rows
    lm = QuambaLM(with_tokenizer(write_state_spaces(padded, tmp_path / "m")), device="cpu", progress=False)
    lm.model = PaddedRowsWin(lm.model)
    tokens = lm.greedy(lm.tok_encode("Hello"), 8)
    assert tokens and max(tokens) < 4096


def run_perplexity(lm, data, max_tokens=None):
    """The perplexity task through lm-eval: (results, per-item samples)."""
    output = simple_evaluate(model=lm, tasks=[perplexity.task_config(lm, data, max_tokens)],
                             task_manager=task_manager([]), log_samples=True, bootstrap_iters=0)
    name = perplexity.task_name(data)
    return output["results"][name], output["samples"][name]


def plain_nll(lm, text, window):
    """nll (nats) and token count of a document by plain forwards: every token predicted once, the
    first from the prefix token, `window` at a time, each seeing up to `window` tokens before it."""
    ids = [lm.prefix_token_id] + lm.tok_encode(text)
    nll, tokens = 0.0, 0
    for first in range(1, len(ids), window):  # predict ids[first:last]...
        last = min(first + window, len(ids))
        inputs = torch.tensor([ids[max(0, last - window - 1):last]])  # ...seeing up to `window` tokens before each
        with torch.no_grad():
            logits = lm.model(inputs[:, :-1]).logits[0, -(last - first):]
        nll += torch.nn.functional.cross_entropy(logits.float(), inputs[0, -(last - first):], reduction="sum").item()
        tokens += last - first
    return nll, tokens


def test_perplexity_task_equals_a_plain_forward(tmp_path, dirs):
    lm = QuambaLM(dirs[0], batch_size=8, device="cpu", max_length=32, progress=False)
    text = " ".join(["Perplexity counts every token of a held-out document exactly once."] * 12)
    (tmp_path / "held_out.txt").write_text(f"{text}\n\nA second, short document.\n")
    results, samples = run_perplexity(lm, tmp_path / "held_out.txt")
    plain = [plain_nll(lm, doc, 32) for doc in (text, "A second, short document.")]
    nll, tokens = sum(n for n, _ in plain), sum(t for _, t in plain)
    words, size = len(text.split()) + 4, len(text) + len("A second, short document.")
    assert results["perplexity,none"] == pytest.approx(math.exp(nll / tokens), rel=1e-6)
    assert results["word_perplexity,none"] == pytest.approx(math.exp(nll / words), rel=1e-6)
    assert results["byte_perplexity,none"] == pytest.approx(math.exp(nll / size), rel=1e-6)
    assert results["bits_per_byte,none"] == pytest.approx(nll / size / math.log(2), rel=1e-6)
    assert [s["perplexity"][0] for s in samples] == pytest.approx([-n for n, _ in plain], rel=1e-6)
    assert [s["perplexity"][1] for s in samples] == [t for _, t in plain]


def test_perplexity_task_equals_the_earlier_scoring_on_the_demo_model():
    """Version 1 of the task (code of our own over the adapter's windows) gave these numbers on
    mamba1-demo's first 2048 held-out tokens (bench/README.md, the default study's fp16 row)."""
    if not (DEMOS["mamba1-demo"] / "model.safetensors").is_file():
        pytest.skip("mamba1-demo is not built")
    lm = QuambaLM(DEMOS["mamba1-demo"], device="cpu", progress=False)
    results, samples = run_perplexity(lm, None, max_tokens=2048)
    assert sum(s["perplexity"][1] for s in samples) == 2048
    nll = -sum(s["perplexity"][0] for s in samples)
    assert nll == pytest.approx(9142.179851300083, rel=1e-6)  # version 1: nll 9142.18 nats over 2048 tokens
    assert results["perplexity,none"] == pytest.approx(86.8302449864206, rel=1e-6)
    assert results["word_perplexity,none"] == pytest.approx(682.2986171416374, rel=1e-6)
    assert results["bits_per_byte,none"] == pytest.approx(1.5108107141335203, rel=1e-6)


def test_perplexity_max_tokens_scores_the_first_tokens_only(tmp_path, ours):
    first = " ".join(["The first document is long enough to be cut by the token budget."] * 6)
    (tmp_path / "held_out.txt").write_text(f"A short one.\n\n{first}\n\nA third, never scored.\n")
    short = len(ours.tok_encode("A short one."))
    budget = short + 20
    rows, _ = perplexity.documents(ours, tmp_path / "held_out.txt", budget)
    cut = ours.tok_decode(ours.tok_encode(first)[:20]).rstrip()
    assert [row["text"] for row in rows] == ["A short one.", cut] and sum(row["tokens"] for row in rows) <= budget
    results, samples = run_perplexity(ours, tmp_path / "held_out.txt", budget)
    (tmp_path / "cut.txt").write_text(f"A short one.\n\n{cut}\n")
    whole, _ = run_perplexity(ours, tmp_path / "cut.txt")
    assert results["perplexity,none"] == pytest.approx(whole["perplexity,none"], rel=1e-9)
    assert results["word_perplexity,none"] == pytest.approx(whole["word_perplexity,none"], rel=1e-9)
    everything, _ = perplexity.documents(ours, tmp_path / "held_out.txt", 10**6)
    assert len(everything) == 3
    with pytest.raises(ConfigError, match="max_tokens=0 is not allowed"):
        perplexity.documents(ours, tmp_path / "held_out.txt", 0)


def test_evaluate_writes_results_with_provenance_and_reruns_byte_identical(tmp_path, model_dir, monkeypatch):
    import subprocess

    import torch.utils.collect_env

    def no_subprocess(*args, **kwargs):  # lm-eval's machine report (pip list, nvidia-smi, git) is skipped
        raise AssertionError(f"an evaluation started a subprocess: {args}")

    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    runs = [tmp_path / "a.json", tmp_path / "b.json"]
    for out in runs:
        evaluate(model_dir, ["quamba_mc", "quamba_cloze", "perplexity"], out, batch_size=4, limit=5, device="cpu",
                 progress=False)
    assert runs[0].read_bytes() == runs[1].read_bytes()  # quamba_cloze's perplexity stderr is bootstrapped
    per_item = [samples_path(out) for out in runs]
    assert per_item[0].read_bytes() == per_item[1].read_bytes() and per_item[0].name == "a.samples.json.gz"
    doc = json.loads(runs[0].read_text())
    items = read_samples(per_item[0])["tasks"]
    assert items["quamba_mc"]["doc_id"] == [0, 1, 2, 3, 4] and len(items["quamba_mc"]["loglikelihoods"][0]) == 4
    assert sum(items["quamba_mc"]["metrics"]["acc,none"]) / 5 == doc["results"]["quamba_mc"]["acc,none"]
    ppl = items["perplexity"]
    assert ppl["aggregation"]["perplexity,none"] == "weighted_perplexity"
    assert math.exp(-sum(ppl["metrics"]["perplexity,none"]) / sum(ppl["weights"]["perplexity,none"])) == \
        pytest.approx(doc["results"]["perplexity"]["perplexity,none"], rel=1e-12)
    assert "0x" not in runs[0].read_text()  # no memory addresses from lm-eval's config dump
    assert set(doc["results"]) == {"quamba_mc", "quamba_cloze", "perplexity"}
    assert doc["n-samples"]["quamba_mc"] == {"original": 500, "effective": 5}
    assert doc["versions"]["quamba_mc"] == 2.0 and doc["configs"]["quamba_mc"]["output_type"] == "multiple_choice"
    assert doc["configs"]["quamba_mc"]["metadata"]["config_source"] == "resources/tasks/quamba_mc.yaml"
    assert doc["configs"]["perplexity"]["metadata"]["data"] == "resources/corpus/test.txt"
    assert doc["model"]["path"] == str(model_dir) and doc["model"]["quant_config"] is None
    assert doc["model"]["sha256"] == sha256_files([model_dir / "config.json", model_dir / "model.safetensors"])
    assert doc["settings"] == {"batch_size": 4, "limit": 5, "num_fewshot": 0, "seed": None, "max_length": 2048,
                               "seeds": {"random": 0, "numpy": 1234, "torch": 1234, "fewshot": 1234},  # Quamba's
                               "device": "cpu", "dtype": "float32", "softmax_dtype": None}
    assert "lm-eval" in doc["package_versions"]
    assert doc["known_departures"]["perplexity"].startswith("perplexity is lm-eval's rolling loglikelihood")
    assert ("lm_eval_version" in doc["known_departures"]) == (doc["package_versions"]["lm-eval"] != "0.4.2")
    assert not {"date", "git_hash", "config", "samples", "total_evaluation_time_seconds"} & set(doc)


def test_provenance_takes_the_weights_hash_from_the_dirs_record(tmp_path, model_dir, monkeypatch):
    import quamba.models.checkpoint as checkpoint

    copy = shutil.copytree(model_dir, tmp_path / "model")
    hashed = sha256_files([copy / "config.json", copy / "model.safetensors"])
    checkpoint.record_model_sha256(copy)
    monkeypatch.setattr(checkpoint, "sha256_files", lambda files: pytest.fail(f"hashed {files} again"))
    assert qeval.model_provenance(copy, "m")["sha256"] == hashed


def test_provenance_carries_the_quant_config(tmp_path, model_dir):
    copy = shutil.copytree(model_dir, tmp_path / "model")
    record = {"schema_version": QUANT_CONFIG_VERSION, "scheme": "w8a8", "alpha": 0.9995}
    (copy / "quant_config.json").write_text(json.dumps(record))
    assert qeval.model_provenance(copy, "m")["quant_config"] == record
    (copy / "quant_config.json").write_text(json.dumps(record) + "\n}")  # damaged: named, no raw traceback
    with pytest.raises(CheckpointError, match=r"model/quant_config.json: unreadable quant_config"):
        qeval.model_provenance(copy, "m")


@pytest.mark.parametrize("change, error, message", [
    ({"tasks": ["quamba_mcc"]}, ConfigError, r"task 'quamba_mcc': unknown; allowed: .*did you mean quamba_mc"),
    ({"tasks": ["perplexity:/no/such.txt"]}, ConfigError, r"/no/such.txt is not a file"),
    ({"tasks": [f"perplexity:{REPO / 'config.yaml'}"]}, ConfigError, r"config.yaml is no .txt or .jsonl file"),
    ({"tasks": []}, ConfigError, "tasks: empty"),
    ({"tasks": ["perplexity", "perplexity"]}, ConfigError, "names a task twice"),
    ({"batch_size": 0}, ConfigError, r"batch_size: 0 is not allowed; expected a positive integer"),
    ({"limit": -1}, ConfigError, r"limit: -1 is not allowed"),
    ({"model_dir": "no_config"}, CheckpointError, r"config\.json: missing"),
    ({"model_dir": "no_tokenizer"}, CheckpointError, r"no tokenizer"),
    ({"model_dir": "missing"}, CheckpointError, r"no such model directory"),
    ({"seed": -5}, ConfigError, r"seed: -5 is not allowed; expected an integer in \[0, 2\^32\)"),
    ({"softmax_dtype": "float8"}, ConfigError, r"dtype: 'float8' is not supported"),
    ({"out": "a_file/eval.json"}, ConfigError, r"a_file/eval.json lies under a file"),
])
def test_bad_input_fails_before_any_model_work_and_writes_nothing(tmp_path, model_dir, monkeypatch, change, error,
                                                                 message):
    (tmp_path / "no_config").mkdir()
    shutil.copytree(model_dir, tmp_path / "no_tokenizer", ignore=shutil.ignore_patterns("tokenizer*"))
    monkeypatch.setattr(quamba.lm_eval_model, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "a_file").write_text("x")
    args = {"model_dir": model_dir, "tasks": ["quamba_mc"], "batch_size": 8, "limit": None} | change
    if isinstance(args["model_dir"], str):
        args["model_dir"] = tmp_path / args["model_dir"]
    with pytest.raises(error, match=message):
        evaluate(args.pop("model_dir"), args.pop("tasks"), tmp_path / args.pop("out", "out/eval.json"), **args)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_lm_eval_finds_the_adapter_by_name_and_keeps_its_own_models(model_dir):
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("quamba") is QuambaLM and {"hf", "mamba_ssm", "vllm"} <= set(model_registry.keys())
    run = simple_evaluate(model="quamba", model_args=f"path={model_dir},batch_size=2,device=cpu,progress=False",
                          tasks=["quamba_mc"], task_manager=task_manager(["quamba_mc"]), limit=3, bootstrap_iters=0)
    assert run["n-samples"]["quamba_mc"]["effective"] == 3


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_demo_model_scores_above_chance(tmp_path, name):
    if not (DEMOS[name] / "model.safetensors").is_file():
        pytest.skip(f"{DEMOS[name]} is not built (resources/build/train_demo.py)")
    results = evaluate(DEMOS[name], ["quamba_cloze"], tmp_path / "eval.json", limit=100, device="cpu",
                       progress=False)["results"]
    held_out, _ = run_perplexity(QuambaLM(DEMOS[name], device="cpu", progress=False), None, max_tokens=2048)
    # quamba_mc, with its margin in standard errors: tests/test_demo_models.py
    assert results["quamba_cloze"]["acc,none"] >= 0.04  # greedy decoding of a whole word: chance ~ 0
    assert results["quamba_cloze"]["perplexity,none"] < 4096 / 4  # per target word; uniform: 4096 per token
    assert held_out["perplexity,none"] < 4096 / 20  # per token, first 2048 held-out tokens


def test_an_evaluation_whose_metric_is_not_finite_fails_and_writes_nothing(tmp_path):
    model = random_model(LAYERS["Mamba1"])
    with torch.no_grad():
        model.backbone.norm_f.weight.fill_(1e38)  # finite weights whose logits overflow to inf
    model_dir = with_tokenizer(write_state_spaces(model, tmp_path / "m", "model.safetensors"))
    for task in ("perplexity", "quamba_mc"):  # NaN or inf loglikelihoods never become a score (acc 0.25: chance)
        with pytest.raises(quamba.errors.ResultError, match=r"m: a loglikelihood is -?(inf|nan) \(the model's logits "
                                                            r"are not finite\); nothing was written"):
            evaluate(model_dir, [task], tmp_path / "out.json", perplexity_tokens=64, limit=4, progress=False)
        assert not (tmp_path / "out.json").exists() and not samples_path(tmp_path / "out.json").exists()
