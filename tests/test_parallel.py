"""The GPU paths, tested on CPU as far as PyTorch allows: the attention kernel choice (O(L) kernels only on CUDA,
k/v expanded for the memory-efficient kernel), mixed-precision FSDP2 on 2 gloo processes, torch.compile per
block, and the lean mode (bf16 weights + torchao's 8-bit AdamW: the loss falls, resume is exact)."""

import gc
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend

import train
from ropelite.errors import RopeliteError
from ropelite.hf import save_model
from ropelite.model import (Attention, KernelChoice, Llama, LlamaConfig, attention_kernel_note, attention_probs,
                            choose_kernel)
from ropelite.parallel import compile_blocks, set_learning_rate, shard, sync_flags, sync_on_last_micro_batch
from ropelite.presets import preset
from ropelite.rope import RopeConfig
from ropelite.training import random_model

ROOT = Path(__file__).resolve().parents[1]
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- attention kernels

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(9, 3), (8, 8)])
def test_cuda_never_allows_the_quadratic_math_kernel(dtype, causal, heads):
    kernel = choose_kernel("cuda", dtype, *heads, causal=causal)
    assert kernel.backends and SDPBackend.MATH not in kernel.backends
    assert set(kernel.backends) <= {SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                    SDPBackend.CUDNN_ATTENTION}
    # Only flash takes enable_gqa; whenever it cannot run (fp32, or a boolean mask), GQA k/v are expanded.
    flash = dtype != torch.float32 and causal
    assert (SDPBackend.FLASH_ATTENTION in kernel.backends) == flash
    assert kernel.expand_kv == (not flash and heads[0] != heads[1])


def test_forced_fp32_gqa_on_cuda_takes_the_memory_efficient_kernel_on_expanded_kv():
    smollm2 = preset("SmolLM2-135M")                                   # 9 query heads, 3 key/value heads
    kernel = choose_kernel("cuda", torch.float32, 9, 3, causal=True)
    assert kernel == KernelChoice((SDPBackend.EFFICIENT_ATTENTION,), True, kernel.name)
    note = attention_kernel_note(smollm2, "cuda", torch.float32)
    assert note == "attention (float32, cuda): memory-efficient, k/v expanded 3 -> 9 heads"
    assert "native GQA; cached decoding steps: memory-efficient, k/v expanded 3 -> 9" in \
        attention_kernel_note(smollm2, "cuda", torch.bfloat16)
    assert choose_kernel("cpu", torch.float32, 9, 3, causal=True).backends is None


@pytest.mark.parametrize("T, S", [(12, 12), (1, 12), (5, 12)])
def test_expanded_kv_gives_the_outputs_of_enable_gqa_and_of_the_written_out_softmax(T, S):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, T, 16), torch.randn(2, 2, S, 16), torch.randn(2, 2, S, 16)
    q_pos = torch.arange(S - T, S)
    native = Attention._sdpa(q, k, v, q_pos)                                         # enable_gqa
    expanded = Attention._sdpa(q, k, v, q_pos, KernelChoice(None, True, "expanded"))
    probs = attention_probs(q, k, q_pos)                                              # (B, H, T, S)
    written = (probs.view(2, 2, 3, T, S) @ v.unsqueeze(2)).view(2, 6, T, 16)          # head h reads h // 3
    torch.testing.assert_close(expanded, native, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(expanded, written, rtol=1e-5, atol=1e-6)


def test_no_o_l_kernel_is_an_error_naming_the_fix():
    """On CPU the memory-efficient kernel does not exist: allowing only it is the CUDA situation of a shape no
    O(L) kernel takes, and must end in a one-line error, never in the math kernel."""
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    only_efficient = KernelChoice((SDPBackend.EFFICIENT_ATTENTION,), True, "memory-efficient")
    with pytest.raises(RopeliteError, match=r"math kernel would build the 8 x 8 scores.*--dtype bf16"):
        Attention._sdpa(q, k, k, torch.arange(8), only_efficient)


# ---------------------------------------------------------------- training pieces

def test_only_the_last_micro_batch_syncs_gradients():
    assert sync_flags(1) == [True]
    assert sync_flags(4) == [False, False, False, True]
    assert sync_flags(4, sync_every_micro_batch=True) == [True] * 4


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone, and its device mesh, for FSDP2 in-process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'rendezvous'}")
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("keep_attention", [False, True])
def test_fsdp_reduces_gradients_only_after_the_last_micro_batch(one_process_group, keep_attention):
    """Under FSDP2 the sharded .grad appears only when a backward reduce-scatters: not after micro-batches 1 and
    2 of 3, then after the 3rd, holding the sum of all three (checkpointing on: its recomputation must not count
    as a micro-batch; with keep_attention the recompute reuses the saved attention of the unsharded weights)."""
    torch.manual_seed(0)
    plain = random_model(tiny_config(), seed=0)
    sharded = random_model(tiny_config(), seed=0)
    shard(sharded, one_process_group, torch.float32)
    sharded.gradient_checkpointing = plain.gradient_checkpointing = True
    sharded.keep_attention = keep_attention
    batches = [torch.randint(0, 64, (1, 16)) for _ in range(3)]
    with sync_on_last_micro_batch(sharded, 3):
        for i, ids in enumerate(batches):
            sharded.nll(ids)[0].backward()
            plain.nll(ids)[0].backward()
            assert all((p.grad is not None) == (i == 2) for p in sharded.parameters()), i
    for (name, a), b in zip(plain.named_parameters(), sharded.parameters()):
        torch.testing.assert_close(b.grad.full_tensor(), a.grad, rtol=1e-5, atol=1e-6, msg=name)


def _sync_modes_worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    """One of 2 gloo processes: 3 micro-batches of its own under each sync mode; which micro-batches left a
    sharded .grad, and (rank 0) the full gradients of both modes, saved to ``out``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{rendezvous}")
    mesh = init_device_mesh("cpu", (world,))
    batches = torch.randint(0, 64, (world, 3, 1, 16), generator=torch.Generator().manual_seed(0))[rank]
    saved = {}
    for every in (False, True):
        model = random_model(tiny_config(), seed=0)
        shard(model, mesh, torch.float32)
        model.gradient_checkpointing = True
        synced = []
        with sync_on_last_micro_batch(model, 3, sync_every_micro_batch=every):
            for ids in batches:
                (model.nll(ids)[0] * world).backward()  # FSDP2 averages over ranks: the sum over all of them
                synced.append(all(p.grad is not None for p in model.parameters()))
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        saved[every] = {"synced": synced, "grads": grads}
    if rank == 0:
        torch.save(saved, out)
    # Both ranks done, and no FSDP tensor left for gloo's threads to release during the interpreter's exit (which
    # aborts the process: pytorch/pytorch#179291)
    dist.barrier()
    del model, grads, saved
    gc.collect()
    dist.destroy_process_group()


def test_reduce_scattering_every_micro_batch_gives_the_gradients_of_one_sync_per_step(tmp_path):
    """2 gloo processes, 3 micro-batches each: with sync_every_micro_batch every backward reduce-scatters (the
    sharded .grad exists from the first micro-batch on, not only after the last), and the gradients are those
    of the one sync per step, and of one process summing all 6 micro-batches, within fp32 rounding."""
    import torch.multiprocessing as mp
    mp.spawn(_sync_modes_worker, (2, str(tmp_path / "rendezvous"), str(tmp_path / "grads.pt")), nprocs=2)
    saved = torch.load(tmp_path / "grads.pt")
    assert saved[False]["synced"] == [False, False, True] and saved[True]["synced"] == [True, True, True]
    plain = random_model(tiny_config(), seed=0)
    plain.gradient_checkpointing = True
    for ids in torch.randint(0, 64, (2, 3, 1, 16), generator=torch.Generator().manual_seed(0)).flatten(0, 1):
        plain.nll(ids)[0].backward()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(saved[True]["grads"][name], saved[False]["grads"][name], rtol=1e-5, atol=1e-6,
                                   msg=name)
        torch.testing.assert_close(saved[True]["grads"][name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_learning_rate_is_set_in_place_when_it_is_a_tensor():
    p = torch.nn.Parameter(torch.zeros(2))
    plain = torch.optim.AdamW([p], lr=1.0)
    tensor_lr = torch.optim.AdamW([p], lr=torch.tensor(1.0))
    held = tensor_lr.param_groups[0]["lr"]
    set_learning_rate(plain, 0.25)
    set_learning_rate(tensor_lr, 0.25)
    assert plain.param_groups[0]["lr"] == 0.25
    assert tensor_lr.param_groups[0]["lr"] is held and held.item() == 0.25


def tiny_config(**extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, eos_token_id=63,
                       rope=RopeConfig(theta=1e4, original_max_position_embeddings=16), **extra)


@pytest.mark.slow
@pytest.mark.parametrize("keep_attention", [False, True], ids=["plain", "checkpointed-keeping-attention"])
def test_compiled_blocks_give_the_eager_loss(keep_attention):
    """torch.compile with inductor on CPU (it needs a C++ compiler): same loss and gradients as eager, also when
    compiled blocks are checkpointed with the selective policy of keep_attention."""
    torch.manual_seed(0)
    eager = Llama(tiny_config())
    compiled = Llama(tiny_config())
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)
    compiled.gradient_checkpointing = compiled.keep_attention = keep_attention
    ids = torch.randint(0, 64, (2, 24))
    losses = []
    for model in (eager, compiled):
        nll, _ = model.nll(ids)
        nll.backward()
        losses.append(nll)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [[], ["--compile"]], ids=["eager", "compiled"])
def test_mixed_precision_fsdp_on_two_processes_matches_one_process(tmp_path, compiled):
    """bf16 on 2 gloo processes (FSDP2 MixedPrecisionPolicy: bf16 all-gather and compute, fp32 reduce-scatter,
    2 micro-batches per rank so the first skips its gradient sync; eager or with compiled blocks) against 1 eager
    process (bf16 autocast over fp32 weights): the same losses within bf16's precision."""
    save_model(random_model(tiny_config(tie_word_embeddings=True), seed=0), tmp_path / "base")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 63, 2000))
    args = ["--model", str(tmp_path / "base"), "--data", str(tmp_path / "tokens.npy"), "--rope", "pi",
            "--len", "32", "--tokens", "512", "--batch-tokens", "128", "--lr", "1e-3", "--warmup", "1",
            "--device", "cpu", "--dtype", "bf16", "--quiet", "--save-every", "0", "--eval-tokens", "0"]  # 4 steps
    one = train.main(args + ["--out", str(tmp_path / "one")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "train.py"), *args, *compiled, "--out", str(tmp_path / "two")]
    done = subprocess.run(torchrun, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = [r["loss"] for r in metrics(one)], [r["loss"] for r in metrics(tmp_path / "two")]
    assert len(a) == len(b) == 4 and a[0] == pytest.approx(math.log(64), abs=0.1)
    np.testing.assert_allclose(b, a, rtol=4e-3)   # bf16 has 8 significant bits: 2^-8 = 0.4% per rounding


# ---------------------------------------------------------------- the lean mode

LEAN = ["--init", "random", "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--ffn", "256",
        "--len", "32", "--batch-tokens", "128", "--micro-batch", "2", "--warmup", "1", "--builtin", "prose",
        "--device", "cpu", "--dtype", "bf16", "--quiet", "--eval-tokens", "0", "--lean"]


@pytest.mark.slow
@pytest.mark.torchao
@pytest.mark.skipif(not HAS_TORCHAO, reason="the lean mode needs torchao: pip install 'ropelite[lean]'")
def test_lean_mode_learns_and_resumes_exactly(tmp_path):
    """bf16 weights + AdamW8bit (hidden 64 so that the big matrices get 8-bit states): the loss on repeated
    text falls far below its start, and a run stopped and resumed ends with the same weights bit for bit."""
    (tmp_path / "fox.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    args = LEAN + ["--data", str(tmp_path / "fox.txt"), "--tokens", "1280", "--lr", "1e-2",
                   "--schedule", "constant", "--save-every", "5"]                       # 10 steps
    straight = train.main(args + ["--out", str(tmp_path / "straight")])
    losses = [r["loss"] for r in metrics(straight)]
    assert losses[0] == pytest.approx(math.log(257), abs=0.1) and max(losses[-2:]) < losses[0] - 1.5
    cut = tmp_path / "cut"
    train.main(args + ["--out", str(cut), "--stop-after", "3"])
    train.main(args + ["--out", str(cut), "--resume"])
    assert [r["loss"] for r in metrics(cut)] == losses
    from safetensors.torch import load_file
    a, b = load_file(straight / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lean_refuses_several_processes():
    from ropelite.parallel import lean_weights
    with pytest.raises(RopeliteError, match="one-GPU mode"):
        lean_weights(Llama(tiny_config()), world=2)
