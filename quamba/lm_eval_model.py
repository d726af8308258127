"""The lm-eval model `quamba`: any model dir `quamba.load` reads, scored by lm-eval.

The adapter is thin on purpose: lm-eval builds the requests and computes every metric; the adapter
only turns text into tokens the way lm-eval's own HFLM does, and tokens into log-probabilities.
Through lm-eval itself: `simple_evaluate(model="quamba", model_args="path=DIR,batch_size=8", ...)`
(`import quamba` registers the name).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  lm-eval's own models first: its registry fills itself only while empty
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from quamba.compile_lock import first_compile_lock
from quamba.data import check_has_tokenizer
from quamba.errors import CheckpointError, ConfigError, ResultError
from quamba.models.checkpoint import read_config, resolve_model_dir, weight_files
from quamba.models.decode import Decoder
from quamba.models.load import load

eval_logger = logging.getLogger(__name__)
DEFAULT_MAX_LENGTH = 2048  # HFLM's default context when the model names none; Mamba has no limit
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's default
# Target positions whose float32 log-softmax is held at once. A perplexity batch of 64 windows x
# 2048 tokens scores 131072 positions: over a 50280-token vocabulary, 26 GB each for the float32
# logits and their log-softmax if taken whole; 0.8 GB each in chunks of 4096. Every op here works
# row by row, so the chunks give the same scores bit for bit (tests/test_eval.py).
SCORED_ROWS = 4096


def positive_int(name: str, value: Any) -> int:
    """`value` as an int >= 1 (digit strings from lm-eval's model_args included), else ConfigError."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}: {value!r} is not allowed; expected a positive integer")
    return value


def check_model_dir(path_or_hub_id: str | Path) -> Path:
    """The local model dir, after checking it holds a config, weights and a tokenizer."""
    model_dir = resolve_model_dir(path_or_hub_id)
    read_config(model_dir)
    weight_files(model_dir)
    check_has_tokenizer(model_dir)
    return model_dir


@register_model("quamba")
class QuambaLM(TemplateLM):
    """Any model dir `quamba.load` reads (or hub id), as an lm-eval model.

    model_args: path, batch_size (8), device (cuda when present), dtype (quamba.load's default),
    max_length (2048 tokens; longer inputs lose tokens on the left), max_gen_toks (256),
    softmax_dtype (None: the logits' dtype, as HFLM and so Quamba's wrapper; float32 scores an
    fp16 model more finely). Loglikelihoods match lm-eval's HFLM on the same weights: same token
    boundaries, same left truncation, log-softmax over the model's whole (padded) vocabulary in
    softmax_dtype, a continuation's log-probabilities summed in it.
    """

    def __init__(self, path: str | Path, batch_size: int | str = 8, device: str | None = None,
                 dtype: str | None = None, max_length: int | str = DEFAULT_MAX_LENGTH,
                 max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS, max_batch_size: int | None = None,
                 progress: bool = True, softmax_dtype: str | None = None) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        from quamba.models.load import parse_dtype

        self.softmax_dtype = parse_dtype(softmax_dtype)  # None: the logits' own
        self.batch_size = positive_int("batch_size", batch_size)
        self._max_length = positive_int("max_length", max_length)
        self.max_gen_toks = positive_int("max_gen_toks", max_gen_toks)
        self.progress = progress
        model_dir = self.model_dir = check_model_dir(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if self.tokenizer.eos_token_id is None and self.tokenizer.bos_token_id is None:
            raise CheckpointError(f"{model_dir}: the tokenizer has neither an EOS nor a BOS token; "
                                  f"one is needed to score text that starts a document")
        self.model = load(model_dir, device=device, dtype=dtype)
        self._device = self.model.device
        self._decoder: Decoder | None = None  # greedy decoding's, made on its first use
        self.scoring_seconds = 0.0  # wall time in loglikelihood scoring and generation, for job logs
        self.first_batch_seconds: float | None = None  # the first batch's, scores read back: warm-up shows here
        # Generation never picks a row past the tokenizer's vocabulary (mamba_ssm pads it to a multiple of 8).
        self.vocab_size = len(self.tokenizer)
        if self.vocab_size > self.model.config.padded_vocab_size:
            raise CheckpointError(f"{model_dir}: the tokenizer has {self.vocab_size} tokens, but the model's "
                                  f"vocabulary only {self.model.config.padded_vocab_size}")

    # -- tokens, as HFLM makes them --------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.tokenizer.bos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context or a document start is conditioned on: BOS, else EOS (as HFLM)."""
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # Mamba tokenizers add nothing on encode; the prefix token is placed explicitly where needed.
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # -- scoring --------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, rows: Sequence[list[int]]) -> torch.Tensor:
        """Logits of right-padded rows: (b, max len, padded vocab). Mamba is causal and has no
        attention mask, so the padding after a row's end never changes the positions before it."""
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.prefix_token_id, dtype=torch.long)  # (b, l)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return self.model(ids.to(self._device)).logits  # (b, l, padded_vocab)

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is the greedy choice) per request.

        requests: (cache key or None, context tokens, continuation tokens), as lm-eval's
        TemplateLM.loglikelihood encodes them (its `_encode_pair`: trailing context spaces move to
        the continuation; an empty context becomes the prefix token). A whitespace-only context
        leaves no context tokens after that move; lm-eval's own empty-context rule applies to it
        (conditioned on the prefix token), where HFLM 0.4.13 stops on an assertion.
        Batches run longest first (the first batch shows the memory peak; rows of a batch have
        similar lengths, so little is padded); results come back in the requests' order. A
        batch's scores are read back once the next batch is launched, so on a GPU its one host
        sync overlaps the next forward instead of leaving the GPU idle while the host works; only
        the process's first batch is read back at once, timing the warm-up (kernel compilation,
        autotuning) apart from the steady scoring (`first_batch_seconds`, in the job logs). On CUDA
        with QUAMBA_COMPILE_LOCK=1 that batch runs under quamba.compile_lock, so processes started
        together compile in turn and the later ones read the on-disk kernel caches (its wait counts
        in first_batch_seconds)."""
        inputs, targets = [], []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("loglikelihood: a request with an empty continuation has nothing to score")
            if len(continuation) > self.max_length:
                raise ValueError(f"loglikelihood: a continuation of {len(continuation)} tokens exceeds "
                                 f"max_length={self.max_length}; raise the model's max_length")
            context = context or [self.prefix_token_id]
            # The last token is only a target. Too long: drop tokens on the left, as HFLM does.
            inputs.append((context + continuation)[-(self.max_length + 1):][:-1])
            targets.append(continuation)
        begun = time.perf_counter()
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        batches = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        with tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or not self.progress) as bar:
            pending = None  # (batch, its scores on the device), not read back yet
            for batch in batches:
                # Launch this batch, then read the one before: its host sync then waits for that
                # batch only, while this one's kernels keep the GPU busy (the same scores either way).
                rows, wanted = [inputs[i] for i in batch], [targets[i] for i in batch]
                if pending is None and self.first_batch_seconds is None:  # the process's first: kernels
                    with first_compile_lock(self._device, "first scored batch"):  # compile and autotune in it
                        self._collect(requests, targets, batch, self._score(rows, wanted), results)
                    self.first_batch_seconds = time.perf_counter() - begun
                    bar.update(len(batch))
                    continue
                launched = (batch, self._score(rows, wanted))
                if pending is not None:
                    self._collect(requests, targets, *pending, results)
                    bar.update(len(pending[0]))
                pending = launched
            if pending is not None:
                self._collect(requests, targets, *pending, results)
                bar.update(len(pending[0]))
        self.scoring_seconds += time.perf_counter() - begun
        return results

    @torch.inference_mode()
    def _score(self, rows: list[list[int]], targets: list[list[int]]) -> torch.Tensor:
        """(2, targets) on the model's device, not read back: each continuation token's
        log-probability and whether it is the greedy choice, the rows' targets in order."""
        logits = self.logits(rows)  # (b, l, padded_vocab)
        # The logits that predict each continuation token: the last len(target) real positions,
        # gathered in one indexing op (a slice per row costs a kernel launch per request).
        width = logits.shape[1]
        positions = torch.tensor([row * width + p for row, (inp, target) in enumerate(zip(rows, targets))
                                  for p in range(len(inp) - len(target), len(inp))])
        flat = logits.reshape(-1, logits.shape[-1])  # (b * l, padded_vocab)
        positions = positions.to(flat.device)
        wanted = torch.tensor([t for target in targets for t in target], device=flat.device)
        picked = []
        for start in range(0, len(wanted), SCORED_ROWS):  # the log-softmax of SCORED_ROWS targets at a time
            chunk = slice(start, start + SCORED_ROWS)
            logprobs = flat[positions[chunk]].log_softmax(dim=-1, dtype=self.softmax_dtype)  # (rows, vocab)
            picked.append(torch.stack((logprobs.gather(-1, wanted[chunk, None])[:, 0],
                                       (logprobs.argmax(dim=-1) == wanted[chunk]).to(logprobs.dtype))))
        return torch.cat(picked, dim=1)  # (2, targets), in the log-softmax's dtype

    def _collect(self, requests: list[tuple[Any, list[int], list[int]]], targets: list[list[int]],
                 batch: list[int], picked: torch.Tensor, results: list[tuple[float, bool]]) -> None:
        """Read one batch's scores back (one host sync) into `results` and lm-eval's cache."""
        values = picked.cpu()
        token_logprobs, token_greedy = values[0], values[1].tolist()
        offset = 0
        for i in batch:
            end = offset + len(targets[i])
            # HFLM's float(logits.sum()): the sum in the log-softmax's dtype (fp16 on an fp16 model)
            results[i] = (float(token_logprobs[offset:end].sum()), all(token_greedy[offset:end]))
            if not math.isfinite(results[i][0]):
                raise ResultError(f"{self.model_dir}: a loglikelihood is {results[i][0]} (the model's logits are "
                                  f"not finite); nothing was written: check its weights, scales and config")
            offset = end
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(document), each token predicted once, with up to max_length tokens of context."""
        windows, owners = [], []
        for owner, (text,) in enumerate(request.args for request in requests):
            pairs = get_rolling_token_windows(self.tok_encode(text), prefix_token=self.prefix_token_id,
                                              max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------------
    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_new_tokens: int, stop: Sequence[str] = ()) -> list[int]:
        """Greedy tokens after `prompt`, decoded step by step on the model's state cache; ends at
        EOS, after max_new_tokens, or once the decoded text holds a stop string."""
        first = self._decoder is None  # its capture and the first prefill compile: one process at a time
        with first_compile_lock(self._device, "first decoding") if first else contextlib.nullcontext():
            if first:  # made once: on CUDA its step is a captured graph
                self._decoder = Decoder(self.model, batch_size=1)
            decoder = self._decoder
            decoder.reset()
            ids = torch.tensor([prompt], dtype=torch.long, device=self._device)  # (1, l)
            logits = self.model(ids, cache=decoder.cache).logits[0, -1]  # (padded_vocab,)
        tokens: list[int] = []
        while len(tokens) < max_new_tokens:
            token = int(logits[:self.vocab_size].argmax())
            if token == self.eot_token_id:
                break
            tokens.append(token)
            if stop and any(s in self.tok_decode(tokens) for s in stop):
                break
            step = torch.tensor([[token]], dtype=torch.long, device=self._device)  # (1, 1)
            logits = decoder.step(step)[0, -1]
        return tokens

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        begun = time.perf_counter()
        eos = self.tokenizer.decode([self.eot_token_id])
        out = []
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm or not self.progress):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ConfigError("generate_until: do_sample=True was asked; the quamba adapter decodes greedily only")
            until = handle_stop_sequences(kwargs["until"], eos=eos)
            max_new = kwargs["max_gen_toks"]
            if max_new >= self.max_length:
                raise ConfigError(f"max_gen_toks: {max_new} must be less than max_length={self.max_length}")
            prompt = (self.tok_encode(context) or [self.prefix_token_id])[-(self.max_length - max_new):]
            text = postprocess_generated_text(self.tok_decode(self.greedy(prompt, max_new, until)), until, None)
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        self.scoring_seconds += time.perf_counter() - begun
        return out
