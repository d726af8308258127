"""Held-out perplexity of a model dir on a text file: per token, per word and in bits per byte.

Each document is scored on its own, starting from the prefix token (BOS, else EOS), in lm-eval's
rolling windows of seq_len tokens: every token is predicted exactly once; each window predicts
`stride` new tokens (the first seq_len), so after the first window every prediction sees at least
seq_len - stride tokens of context, and a document's last window reaches back a full seq_len.
stride = seq_len (the default) gives non-overlapping windows; a smaller stride gives more
context per prediction at more cost.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from quamba.data import read_documents
from quamba.errors import ConfigError
from quamba.shipped import HELD_OUT_TEXT, shown

if TYPE_CHECKING:
    from quamba.lm_eval_model import QuambaLM

VERSION = 1




def _exp(x: float) -> float:
    """exp without OverflowError: a perplexity beyond float range is inf (then refused as a result)."""
    return math.exp(x) if x < 709.0 else math.inf

def evaluate_perplexity(lm: QuambaLM, data: str | Path = HELD_OUT_TEXT, seq_len: int | None = None,
                        stride: int | None = None, limit: int | None = None,
                        max_tokens: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scores, settings) of `lm` on `data` (.txt: documents separated by blank lines; .jsonl: a
    `text` field per line). seq_len defaults to the adapter's max_length; limit keeps the first
    documents; max_tokens then keeps the first tokens of those, cutting the last document kept
    (words and bytes then count its scored part). nll is the total in nats; perplexity =
    exp(nll / tokens), word_perplexity = exp(nll / whitespace-separated words)."""
    seq_len = seq_len or lm.max_length
    stride = stride or seq_len
    if not 1 <= stride <= seq_len <= lm.max_length:
        raise ConfigError(f"perplexity: need 1 <= stride ({stride}) <= seq_len ({seq_len}) "
                          f"<= max_length ({lm.max_length})")
    if not Path(data).is_file():
        raise ConfigError(f"perplexity: {data} is not a file; expected a .txt or .jsonl file")
    documents, digest = read_documents(data)
    documents = [text.strip() for text in documents]  # the blank lines between them are the file's format
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"perplexity: max_tokens={max_tokens} is not allowed; expected an integer >= 1 or None")
    scored = documents[:limit] if limit is not None else documents
    encoded, budget = [], max_tokens
    for i, text in enumerate(scored):
        ids = lm.tok_encode(text)
        if budget is not None and len(ids) >= budget:
            ids = ids[:budget]
            scored = [*scored[:i], lm.tok_decode(ids)]
            encoded.append(ids)
            break
        encoded.append(ids)
        budget = None if budget is None else budget - len(ids)
    windows = []
    for ids in encoded:
        pairs = get_rolling_token_windows(ids, prefix_token=lm.prefix_token_id,
                                          max_seq_len=seq_len, context_len=seq_len - stride + 1)
        windows += [(None, context, target) for context, target in map(make_disjoint_window, pairs)]
    nll = -math.fsum(logprob for logprob, _ in lm._loglikelihood_tokens(windows))
    tokens = sum(len(target) for _, _, target in windows)
    words = sum(len(text.split()) for text in scored)
    size = sum(len(text.encode("utf-8")) for text in scored)
    scores = {"nll": nll, "tokens": tokens, "words": words, "bytes": size,
              "perplexity": _exp(nll / tokens), "word_perplexity": _exp(nll / words),
              "bits_per_byte": nll / size / math.log(2)}
    settings = {"data": shown(data), "data_sha256": digest, "seq_len": seq_len, "stride": stride,
                "documents": len(documents), "documents_scored": len(scored), "max_tokens": max_tokens,
                "windows": len(windows),
                "version": VERSION}
    return scores, settings
