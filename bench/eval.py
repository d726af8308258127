"""Loglikelihood speed of the lm-eval adapter against a plain batched forward over the same tokens.

The requests are the offline tasks' own (quamba_cloze targets, quamba_mc choices). The adapter
path is `QuambaLM.loglikelihood`: tokenization, sorting, padding, forward, log-softmax, gather.
The baseline forwards exactly the token rows the adapter scores, in the same batches (longest
first, right-padded), and does nothing else: the ratio is the adapter's overhead, in one process.
Prints one JSON line per model; goal: ratio >= 0.8.

    python bench/eval.py                       # the shipped demo models
    python bench/eval.py --size 130m           # random weights at mamba-130m's width and depth
    python -m bench.eval --arch mamba2-2.7b --profile   # a real architecture (random weights); --profile
        # prints where one adapter run's time goes
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from lm_eval.api.instance import Instance

from bench.profiling import profile, random_model_dir
from quamba.lm_eval_model import QuambaLM
from quamba.models import MambaConfig, MambaLMHeadModel
from quamba.models.checkpoint import save_fp16
from quamba.models.random_checkpoint import ARCHITECTURES

REPO = Path(__file__).resolve().parents[1]
TASK_DATA = REPO / "resources" / "tasks" / "data"
TOKENIZER = REPO / "resources" / "tokenizer"
SIZES = {  # mamba-130m's width and depth with the shipped 4096-token vocabulary
    "mamba-130m": MambaConfig(d_model=768, n_layer=24, vocab_size=4096),
    "mamba2-130m": MambaConfig(d_model=768, n_layer=24, vocab_size=4096, layer="Mamba2", d_state=128,
                               headdim=64, chunk_size=256),
}


def requests(limit: int | None) -> list[Instance]:
    pairs = []
    for line in (TASK_DATA / "quamba_cloze.jsonl").read_text().splitlines()[:limit]:
        doc = json.loads(line)
        pairs.append((doc["context"], doc["target"]))
    for line in (TASK_DATA / "quamba_mc.jsonl").read_text().splitlines()[:limit]:
        doc = json.loads(line)
        pairs += [(doc["context"], " " + choice) for choice in doc["choices"]]
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def scored_rows(lm: QuambaLM, reqs: list[Instance]) -> list[list[int]]:
    """The token rows the adapter forwards, longest first (as it orders them)."""
    encoded = [lm._encode_pair(*r.args) if r.args[0] else ([lm.prefix_token_id], lm.tok_encode(r.args[1]))
               for r in reqs]  # lm-eval's TemplateLM encoding (the bench's requests never start a document)
    rows = [((context or [lm.prefix_token_id]) + continuation)[-(lm.max_length + 1):][:-1]
            for context, continuation in encoded]
    return sorted(rows, key=len, reverse=True)


def best_seconds(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Best wall time of each function; runs alternate, so load from other processes hits both alike."""
    for fn in fns.values():
        fn()  # warm-up: allocator, kernels, tokenizer caches
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def bench(model_dir: Path, name: str, batch_size: int, limit: int | None = None, repeats: int = 3,
          device: str | None = None, profiled: bool = False) -> dict:
    lm = QuambaLM(model_dir, batch_size=batch_size, device=device, progress=False)
    reqs = requests(limit)
    rows = scored_rows(lm, reqs)
    tokens = sum(len(r) for r in rows)
    padded = sum(len(rows[i]) * len(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size))

    @torch.inference_mode()
    def plain() -> None:
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            ids = torch.full((len(batch), len(batch[0])), lm.prefix_token_id, dtype=torch.long)  # (b, l)
            for j, row in enumerate(batch):
                ids[j, :len(row)] = torch.tensor(row)
            lm.model(ids.to(lm.device)).logits  # (b, l, padded_vocab)

    times = best_seconds({"adapter": lambda: lm.loglikelihood(reqs), "plain": plain}, lm.device, repeats)
    adapter_s, plain_s = times["adapter"], times["plain"]
    if profiled:
        profile(lambda: lm.loglikelihood(reqs), f"adapter {name}, {len(reqs)} requests")
    return {"model": name, "device": torch.cuda.get_device_name() if lm.device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "dtype": str(lm.model.dtype).removeprefix("torch."),
            "requests": len(reqs), "tokens": tokens, "padding": round(1 - tokens / padded, 4),
            "batch_size": batch_size, "adapter_s": round(adapter_s, 3), "plain_s": round(plain_s, 3),
            "adapter_tok_s": round(tokens / adapter_s), "plain_tok_s": round(tokens / plain_s),
            "ratio": round(plain_s / adapter_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["demo", "130m"], default="demo")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", help="default: cuda when present")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), help="a real architecture, random weights")
    parser.add_argument("--layers", type=int, default=None, help="with --arch: its first N blocks")
    parser.add_argument("--profile", action="store_true", help="also print a torch profile of one adapter run")
    args = parser.parse_args()
    if args.arch:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = random_model_dir(args.arch, args.layers, Path(tmp))
            print(json.dumps(bench(model_dir, args.arch, args.batch_size, args.limit, args.repeats, args.device,
                                   args.profile)), flush=True)
        return
    if args.size == "demo":
        models = {name: REPO / "resources" / "models" / name for name in ("mamba1-demo", "mamba2-demo")}
        for name, model_dir in models.items():
            row = bench(model_dir, name, args.batch_size, args.limit, args.repeats, args.device)
            print(json.dumps(row), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in SIZES.items():
            model = MambaLMHeadModel(config)
            model.reset_parameters(0)
            model_dir = save_fp16(model, Path(tmp) / name, TOKENIZER)
            row = bench(model_dir, name, args.batch_size, args.limit, args.repeats, args.device)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
