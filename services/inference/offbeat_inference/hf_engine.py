"""The transformers engine: continuous batching over a KV cache, in one stepping thread.

Sequences wait in a queue; between decode steps the engine retires the finished ones (dropping
their rows from the KV cache) and admits waiting ones up to `capacity` (a batched prefill of the
new prompts, whose cache is left-padded and merged with the running batch's; a prompt admitted
for several rows, as the samples of one group are, is computed once). Every step then
decodes one token for every row. Rows are left-aligned with an attention mask and explicit
position ids, so a row's log-probs equal a teacher-forced forward pass of the same weights
(log-prob convention: see `offbeat_inference.engine`). Leading cache columns that only padding
uses are trimmed after retirements.

Weight updates are read into memory off the stepping thread (`weightfile.read_safetensors`: one
read, hashed as it is read when the announced sha256 is given), validated against the model's
parameter names and shapes, and then become the parameters (`param.data = staged`, a pointer swap
per tensor, no copy) between two steps, once the digest matched: on the stepping thread, or on the
reading thread itself when the stepping thread is parked idle (it cannot start a step while the
swap holds its lock). Tokens sampled after the swap carry the new version. A file that does not
fit raises `WeightLoadError`, one that is not the announced one `ChecksumError`; either changes
nothing. The parameters a swap replaces (on the CPU) are kept and the next update is read into
them: two copies of the weights stay in memory (what an update needs at its peak anyway), and an
update does not pay for faulting in fresh memory (here about as much as the read).

Not covered: paged attention, prefix caching across requests, sliding-window or recurrent cache layers (the
engine refuses models that use them), tensor parallelism. For throughput on GPUs use vLLM.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from offbeat.weights import ChecksumError, ChunkDigests
from offbeat_inference.engine import (
    Engine,
    Generation,
    Sampling,
    WeightLoadError,
    WeightsApplied,
    spans_from_versions,
)
from offbeat_inference.sampling import RowSampling, sample
from offbeat_inference.weightfile import read_safetensors

log = logging.getLogger("offbeat.inference.hf")


@dataclass(eq=False)
class _Seq:
    prompt: list[int]
    sampling: Sampling
    row: RowSampling
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Generation]
    stop_window: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    pos: int = 0  # tokens of this row in the KV cache
    started_at: float = 0.0
    cancelled: bool = False


@dataclass(eq=False)
class _Update:
    version: int
    started: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    tensors: int = 0
    read_s: float = 0.0
    swap_s: float = 0.0
    live_s: float = 0.0

    def resolve(self, error: BaseException | None = None) -> None:
        """Wake the caller of `update_weights` (from any thread)."""

        def done() -> None:
            if not self.future.done():
                if error is None:
                    self.future.set_result(None)
                else:
                    self.future.set_exception(error)

        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(done)


class HFEngine(Engine):
    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        capacity: int = 64,
        max_model_len: int = 4096,
        max_prefill_tokens: int = 16384,
        device: str = "cpu",
        trust_remote_code: bool = False,
        static_batches: bool = False,
    ) -> None:
        """`static_batches` admits new sequences only when the batch is empty (the baseline that
        continuous batching is measured against in `bench/inference.py`)."""
        self.model_path = model_path
        self.static_batches = static_batches
        self.dtype = getattr(torch, dtype)
        self.capacity = capacity
        self.max_model_len = max_model_len
        self.max_prefill_tokens = max_prefill_tokens
        self.device = torch.device(device)
        self.trust_remote_code = trust_remote_code
        self.model: Any = None
        self._tokenizer: Any = None
        self._eos: frozenset[int] = frozenset()
        self._version = 0
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._rows: list[_Seq] = []
        self._admitting: list[_Seq] = []  # taken from the queue, not yet rows (during a prefill)
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._updates: list[_Update] = []
        self._finished: list[tuple[_Seq, Generation]] = []
        """Results of the current step, handed to their event loops together by `_deliver`."""
        self._params: dict[str, torch.Tensor] = {}
        """The model's state-dict entries (the Parameter objects themselves), what updates replace."""
        self._aliases: dict[str, list[str]] = {}
        """Names of each entry's storage (tied weights): a file may carry any one of them."""
        self._spare: dict[str, torch.Tensor] = {}
        """Flat bytes of the parameters the last swap replaced: where the next update is read."""
        self._staged: set[int] = set()
        """Storage of the live parameters that an update read (memory of ours, never the model
        files' that transformers may have mapped): the only memory that becomes `_spare`."""
        self._wake = threading.Condition()
        self._parked = False
        """The stepping thread waits on `_wake` with no work: another thread holding the lock may
        swap weights in (no step can start before it lets go)."""
        self._closed = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._cache_kw = "cache"
        self.steps = 0

    # --- Engine API ---------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def in_flight(self) -> int:
        return len(self._waiting) + len(self._rows)

    @property
    def failure(self) -> str | None:
        return None if self._failure is None else f"engine thread failed: {self._failure!r}"

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._run, name="hf-engine", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(
            self.model_path, trust_remote_code=self.trust_remote_code
        )
        model: Any = AutoModelForCausalLM.from_pretrained(
            self.model_path, dtype=self.dtype, trust_remote_code=self.trust_remote_code
        )
        self.model = model.to(self.device).eval()
        # transformers >= 5.24 names the cache argument `cache`, earlier versions `past_key_values`
        # (an unknown keyword is swallowed by **kwargs, so the name must be right)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        eos: set[int] = set()
        for source in (self._tokenizer.eos_token_id, model.generation_config.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(int(x) for x in source)
        self._eos = frozenset(eos)
        self._params = self.model.state_dict(keep_vars=True)
        storage: dict[int, list[str]] = collections.defaultdict(list)
        for name, tensor in self._params.items():
            storage[tensor.data_ptr()].append(name)
        self._aliases = {name: storage[t.data_ptr()] for name, t in self._params.items()}
        with torch.no_grad():  # one prefill: refuse cache layouts the merge does not handle
            cache = self._new_cache()
            self.model(
                input_ids=torch.tensor([[0, 0]], device=self.device),
                use_cache=True,
                **{self._cache_kw: cache},
            )
        from transformers.cache_utils import DynamicLayer

        kinds = {type(layer).__name__ for layer in cache.layers}
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise NotImplementedError(
                f"the transformers engine handles full-attention caches only, got {kinds}"
            )

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> Generation:
        if self._failure is not None:
            raise RuntimeError(f"engine failed: {self._failure!r}")
        if self._closed:
            raise RuntimeError("engine is closed")
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in {self.max_model_len}")
        loop = asyncio.get_running_loop()
        seed = sampling.seed if sampling.seed is not None else random.SystemRandom().getrandbits(63)
        longest_stop = max((len(s.encode()) for s in sampling.stop), default=0)
        seq = _Seq(
            prompt=list(prompt_ids),
            sampling=sampling,
            row=RowSampling(sampling.temperature, sampling.top_p, sampling.top_k, random.Random(seed)),
            loop=loop,
            future=loop.create_future(),
            stop_window=longest_stop + 4,
        )
        with self._wake:
            self._waiting.append(seq)
            self._wake.notify()
        try:
            return await seq.future
        except asyncio.CancelledError:
            seq.cancelled = True
            raise

    async def update_weights(
        self, path: Path, version: int, *, sha256: str | None = None, chunks: ChunkDigests | None = None
    ) -> WeightsApplied:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        update = _Update(version=version, started=started, loop=loop, future=loop.create_future())
        await asyncio.to_thread(self._stage, path, sha256, chunks, update)
        await update.future  # resolved by whichever thread swapped it in, between two steps
        return WeightsApplied(
            version=version,
            apply_s=update.live_s,
            details={
                "tensors": update.tensors,
                "read_s": update.read_s,
                "swap_s": update.swap_s,
                "work_s": update.read_s + update.swap_s,
            },
        )

    async def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    # --- weights ------------------------------------------------------------------------------

    def _stage(self, path: Path, sha256: str | None, chunks: ChunkDigests | None, update: _Update) -> None:
        """Read, verify and check the file, then hand it to be swapped in (reading thread)."""
        with self._wake:  # this update's alone: a concurrent one reads into new memory
            spare, self._spare = self._spare, {}
        try:
            state = read_safetensors(path, sha256=sha256, chunks=chunks, reuse=spare)
        except ChecksumError:
            self._give_back(spare)
            raise
        except (OSError, ValueError) as exc:
            self._give_back(spare)
            raise WeightLoadError(f"{path.name}: not a readable safetensors file: {exc}") from None
        expected = self._params
        unexpected = sorted(set(state) - set(expected))
        missing = sorted(
            name
            for name in expected
            if name not in state and not any(a in state for a in self._aliases[name])
        )
        wrong = [
            f"{n} {tuple(state[n].shape)} != {tuple(expected[n].shape)}"
            for n in state
            if n in expected and state[n].shape != expected[n].shape
        ]
        if unexpected or missing or wrong:
            self._give_back(spare)
            raise WeightLoadError(
                f"{path.name} does not fit the model: unexpected {unexpected[:5]}, missing {missing[:5]}, "
                f"shape mismatch {wrong[:5]}"
            )
        update.tensors = len(state)
        for name, target in expected.items():
            tensor = state.get(name)
            if tensor is None:  # a tied weight the file carries under another name
                tensor = next(state[a] for a in self._aliases[name] if a in state)
            if tensor.dtype != target.dtype or tensor.device != target.device:
                tensor = tensor.to(device=target.device, dtype=target.dtype)
            update.state[name] = tensor
        update.read_s = time.perf_counter() - update.started
        with self._wake:
            if self._closed or self._stopped:
                raise RuntimeError(f"engine stopped before version {update.version} was applied")
            if self._parked:  # idle: swap here rather than wake the stepping thread for it
                self._apply(update)
            else:
                self._updates.append(update)
                self._wake.notify()

    def _give_back(self, spare: dict[str, torch.Tensor]) -> None:
        """Return memory an update did not use (it holds garbage now, and serves nothing)."""
        with self._wake:
            if not self._spare:
                self._spare = spare

    def _apply(self, update: _Update) -> None:
        """Make the staged tensors the parameters (holding `_wake`, or on the stepping thread)."""
        started = time.perf_counter()
        replaced: dict[str, torch.Tensor] = {}
        for name, tensor in update.state.items():
            target = self._params[name]
            if not any(target is self._params[a] and a in replaced for a in self._aliases[name]):
                replaced[name] = target.data  # a tied parameter's old data is taken once
            target.data = tensor
        self._version = update.version
        now_staged = {t.untyped_storage().data_ptr() for t in update.state.values()}
        freed, self._staged = self._staged - now_staged, now_staged
        update.state = {}
        spare: dict[str, torch.Tensor] = {}
        for name, old in replaced.items():
            storage = old.untyped_storage()
            # only memory an update read, that serves no more and that no other tensor shares
            if (
                storage.data_ptr() in freed
                and old.device.type == "cpu"
                and old.is_contiguous()
                and old.storage_offset() == 0
                and storage.nbytes() == old.numel() * old.element_size()
            ):
                freed.discard(storage.data_ptr())
                spare[name] = old.reshape(-1).view(torch.uint8)
        self._spare = spare
        now = time.perf_counter()
        update.swap_s = now - started
        update.live_s = now - update.started
        update.resolve()

    # --- the stepping thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._wake:
                        self._parked = True
                        while not self._closed and not self._rows and not self._waiting and not self._updates:
                            self._wake.wait()
                        self._parked = False
                        if self._closed:
                            break
                        updates, self._updates = self._updates, []
                    for update in updates:
                        self._apply(update)
                    if self._rows or self._waiting:
                        self._step()
                        self._deliver()
        except BaseException as exc:
            self._failure = exc
            log.exception("engine thread failed")
        finally:
            self._abort_all()

    def _abort_all(self) -> None:
        with self._wake:
            held = self._rows + self._admitting + list(self._waiting)
            self._rows, self._admitting, self._cache, self._mask = [], [], None, None
            self._waiting.clear()
            self._parked, self._stopped = False, True
            updates, self._updates = self._updates, []
        for update in updates:
            update.resolve(RuntimeError(f"engine stopped before version {update.version} was applied"))
        for seq in held:
            self._finish(seq, "abort")
        self._deliver()

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _step(self) -> None:
        """Decode the running rows and prefill the admitted ones; with no rows, and nothing but
        cancelled samples waiting (all discarded by `_admit`), there is nothing to run and the
        thread goes back to waiting."""
        parts: list[torch.Tensor] = []
        if self._rows:
            parts.append(self._decode())
        admitted = self._admitting = self._admit()
        if admitted:
            parts.append(self._prefill(admitted))
        self._admitting = []
        if not parts:
            return
        self.steps += 1
        rows = self._rows
        tokens, logprobs = sample(torch.cat(parts) if len(parts) > 1 else parts[0], [s.row for s in rows])
        version = self._version
        keep: list[int] = []
        for i, (seq, tok, lp) in enumerate(zip(rows, tokens.tolist(), logprobs.tolist(), strict=True)):
            seq.tokens.append(tok)
            seq.logprobs.append(lp)
            seq.versions.append(version)
            reason = self._finish_reason(seq, tok)
            if reason is not None:
                self._finish(seq, reason)
            elif seq.cancelled:
                continue
            else:
                keep.append(i)
        if len(keep) < len(rows):
            self._retire(keep)

    def _decode(self) -> torch.Tensor:
        assert self._mask is not None
        rows = self._rows
        ids = torch.tensor([[s.tokens[-1]] for s in rows], device=self.device)
        pos = torch.tensor([[s.pos] for s in rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        out = self.model(
            input_ids=ids,
            attention_mask=self._mask,
            position_ids=pos,
            use_cache=True,
            **{self._cache_kw: self._cache},
        )
        for s in rows:
            s.pos += 1
        return out.logits[:, -1]  # type: ignore[no-any-return]

    def _admit(self) -> list[_Seq]:
        admitted: list[_Seq] = []
        longest = 0
        if self.static_batches and self._rows:
            return admitted
        with self._wake:
            while self._waiting and len(self._rows) + len(admitted) < self.capacity:
                seq = self._waiting[0]
                if seq.cancelled:
                    self._waiting.popleft()
                    continue
                width = max(longest, len(seq.prompt))
                if admitted and width * (len(admitted) + 1) > self.max_prefill_tokens:
                    break
                longest = width
                admitted.append(self._waiting.popleft())
        return admitted

    def _prefill(self, seqs: list[_Seq]) -> torch.Tensor:
        """Prefill the admitted rows; a prompt admitted several times (the samples of one group) is
        run through the model once and its cache and last logits copied to each of its rows."""
        unique: dict[tuple[int, ...], int] = {}
        row_of = [unique.setdefault(tuple(s.prompt), len(unique)) for s in seqs]
        prompts = list(unique)
        width = max(len(p) for p in prompts)
        pad = 0
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        pos = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = self._new_cache()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        logits = out.logits[:, -1]
        if len(prompts) < len(seqs):
            index = torch.tensor(row_of, device=self.device)
            for layer in cache.layers:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
            mask, logits = mask.index_select(0, index), logits.index_select(0, index)
        now = time.time()
        for s in seqs:
            s.pos = len(s.prompt)
            s.started_at = now
        self._merge(cache, mask)
        self._rows = self._rows + seqs
        return logits  # type: ignore[no-any-return]

    def _merge(self, cache: Any, mask: torch.Tensor) -> None:
        """Append the new rows' cache to the running one, left-padding the shorter to one width."""
        if self._cache is None or self._mask is None:
            self._cache, self._mask = cache, mask
            return
        old_w, new_w = self._mask.shape[1], mask.shape[1]
        width = max(old_w, new_w)
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)], dim=0)
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)], dim=0)
        self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)], dim=0)

    def _retire(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not keep or self._mask is None:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int(torch.nonzero(mask.any(dim=0))[0, 0]) if mask.shape[1] else 0
        self._mask = mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]

    def _finish_reason(self, seq: _Seq, token: int) -> str | None:
        if token in self._eos:
            return "stop"
        if seq.sampling.stop:
            tail = self._tokenizer.decode(seq.tokens[-seq.stop_window :], skip_special_tokens=False)
            if any(stop in tail for stop in seq.sampling.stop):
                return "stop"
        if (
            len(seq.tokens) >= seq.sampling.max_tokens
            or len(seq.prompt) + len(seq.tokens) >= self.max_model_len
        ):
            return "length"
        return None

    def _finish(self, seq: _Seq, reason: str) -> None:
        result = Generation(
            token_ids=seq.tokens,
            logprobs=seq.logprobs,
            finish_reason=reason,
            spans=spans_from_versions(seq.versions),
            started_at=seq.started_at,
            finished_at=time.time(),
        )
        self._finished.append((seq, result))

    def _deliver(self) -> None:
        """Resolve the futures of the sequences finished since the last call, with one wakeup of
        each event loop rather than one per sequence (a step that finishes hundreds of short
        sequences spent ~8% of the process in `call_soon_threadsafe` and the loop's self-pipe)."""
        finished, self._finished = self._finished, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Seq, Generation]]] = {}
        for seq, result in finished:
            by_loop.setdefault(seq.loop, []).append((seq, result))
        for loop, results in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, results)


def _resolve(results: list[tuple[_Seq, Generation]]) -> None:
    for seq, result in results:
        if not seq.future.done():
            seq.future.set_result(result)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - t.shape[-2]
    if missing == 0:
        return t
    pad = t.new_zeros((*t.shape[:-2], missing, t.shape[-1]))
    return torch.cat([pad, t], dim=-2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    if missing == 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)
