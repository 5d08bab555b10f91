"""Shared pytest fixtures (keep small)."""

import os

# Tiny models on a shared 2-core box: extra threads only spin against the other jobs and against each other
# (torch's OpenMP pool and numpy's OpenBLAS pool). Measured under load: the three core test files take
# 40-100 s with the default 2 threads, 10 s with one. Set before torch/numpy start their pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # in case torch was imported before this file


@pytest.fixture
def tiny_llama():
    """make(rope=RopeConfig, seed=0, **config_overrides) -> a tiny random fp32 Llama in eval mode (2 layers,
    hidden 64, 4 heads, 2 KV heads, head_dim 16, vocab 97, pretrained length 64). q/k weights are drawn large
    (peaked attention, so RoPE mistakes change the logits visibly), the rest keeps torch's default init."""
    import torch

    from ropelite.model import Llama, LlamaConfig
    from ropelite.rope import RopeConfig

    def make(rope: RopeConfig | None = None, seed: int = 0, **overrides) -> Llama:
        fields = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      rope=rope or RopeConfig(theta=1e4, original_max_position_embeddings=64))
        torch.manual_seed(seed)
        model = Llama(LlamaConfig(**{**fields, **overrides}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
                elif "q_proj" in name or "k_proj" in name:
                    p.normal_(0, 0.3)
        return model.eval()

    return make


class CallLog(list):
    """One entry per call of a wrapped function; the call numbered ``kill_at`` (from 1; 0 = none) raises
    KeyboardInterrupt instead of running, as Ctrl-C at that moment would."""
    kill_at = 0


@pytest.fixture
def count_calls(monkeypatch):
    """count_calls(owner, name) -> CallLog: replaces owner.name, for this test, with a wrapper that logs each call
    and can kill the run at a chosen one (resume tests)."""
    def wrap(owner, name: str) -> CallLog:
        calls, real = CallLog(), getattr(owner, name)

        def counted(*args, **kwargs):
            calls.append(1)
            if len(calls) == calls.kill_at:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
        return calls

    return wrap
