"""Batch-b decoding steps on the state cache, replayed as one CUDA graph per step on a GPU.

A decoding step of a 64-block model is about a thousand small kernels (norms, taps, the conv and
scan updates, one GEMV per linear); launched one by one from Python, batch-1 decode is bound by
the launches, not by the GPU (FP16 mamba2-2.7b: 13.8 tokens/s eager on an H200). `Decoder` records
the step once and replays it: the same kernels in the same order on the same buffers, so replayed
logits are bit-equal to eager ones. On the CPU (or with `GRAPHS_ON_CUDA = False`) it runs the
eager step: the same interface everywhere.

    decoder = Decoder(model, batch_size=1)
    logits = model(prompt, cache=decoder.cache).logits      # prefill fills the decoder's cache
    logits = decoder.step(next_token)                       # (b, 1, vocab), valid until the next step
    decoder.reset()                                         # zeroed states for the next prompt
"""

from __future__ import annotations

import torch

from quamba.models.lm import InferenceCache, MambaLMHeadModel

GRAPHS_ON_CUDA = True  # False: eager steps on CUDA too (for comparisons)
WARMUP_STEPS = 2  # eager steps before the capture: kernels tuned and compiled, lazy buffers made


class Decoder:
    """Decoding steps of `model` at a fixed batch size on its own cache (`self.cache`)."""

    def __init__(self, model: MambaLMHeadModel, batch_size: int):
        self.model = model
        with torch.inference_mode(False):  # plain tensors: prefill may run under no_grad or inference_mode
            self.cache: InferenceCache = model.allocate_cache(batch_size)
        device = self.cache.conv_states[0].device
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # the step's static input
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's static output
        if device.type == "cuda" and GRAPHS_ON_CUDA:
            self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        self.cache.seqlen_offset = 1  # as after a prompt: the model steps
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture wants
            for _ in range(WARMUP_STEPS):
                self.model(self.token, cache=self.cache)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the kernels; nothing runs yet
            self.logits = self.model(self.token, cache=self.cache).logits
        self.reset()

    @torch.inference_mode()
    def reset(self) -> None:
        """Zero the cache's states (in place: the graph reads these very tensors)."""
        for state in (*self.cache.conv_states, *self.cache.ssm_states):
            state.zero_()
        self.cache.seqlen_offset = 0

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (b, 1, vocab) after `token` (b, 1); the states advance one token. With a graph the
        returned tensor is the graph's output buffer: read it before the next step."""
        if self.cache.seqlen_offset == 0:
            raise RuntimeError("Decoder.step: run the prompt through model(prompt, cache=decoder.cache) first")
        if self.graph is None:
            return self.model(token, cache=self.cache).logits
        self.token.copy_(token)
        self.graph.replay()
        self.cache.seqlen_offset += 1
        return self.logits
