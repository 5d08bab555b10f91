"""train.py, its trainer (ropelite.trainer) and ropelite.training: token counts, packing, the schedule, gradients
and one optimizer step against an independent loss and AdamW, bit-identical resume, the saved folder's RoPE and
"trained" record, learning, FSDP on 2 CPU processes, and one-line errors.

Every run is a tiny random model (2 blocks, hidden 32) on 32-token sequences, a few steps.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
import train  # noqa: E402
from ropelite import trainer  # noqa: E402
from ropelite.errors import RopeliteError  # noqa: E402
from ropelite.hf import load_model, save_model, trained_length
from ropelite.io import read_summaries  # noqa: E402
from ropelite.model import Llama, LlamaConfig
from ropelite.rope import RopeConfig  # noqa: E402
from ropelite.data import PackedSequences, pack_documents  # noqa: E402
from ropelite.tokenizer import ByteTokenizer  # noqa: E402
from ropelite.parallel import make_optimizer  # noqa: E402
from ropelite.training import (accumulate_gradients, latest_checkpoint, learning_rate,  # noqa: E402
                               load_trainer_state)

TINY = ["--init", "random", "--layers", "2", "--hidden", "32", "--heads", "4", "--kv-heads", "2", "--len", "32",
        "--batch-tokens", "128", "--micro-batch", "2", "--lr", "3e-3", "--warmup", "2", "--builtin", "prose",
        "--device", "cpu", "--dtype", "fp32", "--quiet"]


def metrics(out: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def checkpoint_tensors(checkpoint: Path, scratch: Path) -> dict:
    """A sharded checkpoint's whole state {"model": {name: tensor}, "optimizer": {"state": ...}}, read by DCP's
    own converter to a torch.save file (the trainer's reader is not used)."""
    import warnings
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(checkpoint, scratch)
    return torch.load(scratch, weights_only=False)


# ---------------------------------------------------------------- pieces

def test_token_count():
    assert train.token_count("262144") == 262144
    assert train.token_count("100M") == 100_000_000
    assert train.token_count("256Ki") == 262144
    assert train.token_count("1e8") == 100_000_000
    with pytest.raises(Exception):
        train.token_count("lots")


def test_packing_joins_documents_with_eos_and_wraps_around():
    docs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6])]
    stream, used = pack_documents(docs, None, eos_id=9, needed=100)
    assert stream.tolist() == [1, 2, 3, 9, 4, 5, 9, 6, 9] and used == 3
    short, used = pack_documents(docs, None, eos_id=9, needed=4)   # enough after the first document
    assert short.tolist() == [1, 2, 3, 9] and used == 1
    seqs = PackedSequences(stream, 4)
    assert seqs.batch(0, 2).tolist() == [[1, 2, 3, 9], [4, 5, 9, 6]]
    assert seqs.batch(2, 2).tolist() == [[9, 1, 2, 3], [9, 4, 5, 9]]   # the stream starts over
    assert ByteTokenizer().encode("hé") == [104, 0xC3, 0xA9]


def test_learning_rate_schedule():
    """The linear warmup from 0 (issue 16.5): step s < warmup updates with peak * s / warmup."""
    assert [learning_rate(s, 1.0, 4, 10) for s in range(4)] == [0.0, 0.25, 0.5, 0.75]
    assert learning_rate(4, 1.0, 4, 10) == 1.0
    assert learning_rate(7, 1.0, 4, 10, "linear") == pytest.approx(0.5)      # half way from step 4 to step 10
    assert learning_rate(7, 1.0, 4, 10, "cosine") == pytest.approx(0.5)
    assert learning_rate(9, 1.0, 4, 10, "constant") == 1.0


def test_learning_rate_floor_clamps_the_decay_but_not_the_warmup():
    """floor: after the warmup the lr never drops below floor x peak (the ablation's pretraining floors its
    cosine at 0.1); the warmup still starts from 0."""
    assert learning_rate(0, 1.0, 4, 10, "cosine", floor=0.1) == 0.0
    assert learning_rate(2, 1.0, 4, 10, "cosine", floor=0.1) == 0.5
    assert learning_rate(7, 1.0, 4, 10, "cosine", floor=0.1) == pytest.approx(0.5)      # above the floor: as is
    assert learning_rate(9, 1.0, 4, 10, "cosine") == pytest.approx(0.0670, abs=1e-4)    # cos(pi 5/6) decay ...
    assert learning_rate(9, 1.0, 4, 10, "cosine", floor=0.1) == 0.1                      # ... held at the floor
    assert learning_rate(9, 1.0, 4, 10, "linear", floor=0.25) == 0.25


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_learning_rate_is_transformers_warmup_schedule(schedule):
    """The lr each optimizer step uses, against transformers' schedulers (YaRN's finetune.py uses the linear
    one): LambdaLR gives step s the lr of lambda(s), step 0 included."""
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
    make = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}[schedule]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    scheduler, used = make(optimizer, num_warmup_steps=5, num_training_steps=23), []
    for _ in range(23):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used[0] == 0.0
    np.testing.assert_allclose([learning_rate(s, 2e-5, 5, 23, schedule) for s in range(23)], used,
                               rtol=1e-12, atol=1e-20)


def test_default_factor_is_len_over_original():
    smollm2 = RopeConfig(theta=1e5, original_max_position_embeddings=8192)
    assert trainer.default_factor(smollm2, "yarn", 32768, None, None) == 4.0
    assert trainer.default_factor(smollm2, "pi", 4096, None, None) == 1.0       # len <= L: no extension
    assert trainer.default_factor(smollm2, "yarn", 32768, None, 8.0) == 8.0
    assert trainer.default_factor(smollm2, "rope", 32768, None, None) is None   # plain RoPE has no factor
    assert trainer.default_factor(smollm2, "ntk", 32768, 1e6, None) is None     # an explicit new base instead
    # the one rule of every script: the checkpoint's own variant keeps its own factor
    yarn8 = smollm2.replace(type="yarn", factor=8.0)
    assert trainer.default_factor(yarn8, None, 32768, None, None) is None
    assert trainer.default_factor(yarn8, "yarn", 32768, None, None) is None


def test_default_batch_fits_the_budget():
    """--batch-tokens left out: YaRN's 262,144 tokens where the budget holds 400 such steps, else --tokens / 400,
    in whole sequences, a multiple of micro-batch x processes, and at least one such unit."""
    assert trainer.default_batch_tokens(400 * 262144, 32768, 1) == 262144    # the default budget: 8 x 32K
    assert trainer.default_batch_tokens(10**9, 4096, 8) == 262144            # 64 sequences of 4K on 8 ranks
    assert trainer.default_batch_tokens(65536, 128, 1) == 128                # 163 tokens: 1 sequence, 512 steps
    assert trainer.default_batch_tokens(32768, 128, 1) == 128                # 81 tokens: still 1 sequence
    assert trainer.default_batch_tokens(2**20, 512, 1) == 5 * 512            # 2621 tokens: 5 sequences
    assert trainer.default_batch_tokens(2**20, 512, 2) == 4 * 512            # ... in pairs, over 2 ranks
    assert trainer.default_batch_tokens(50_000_000, 16384, 8) == 8 * 16384   # 7 sequences: one unit of 8


def test_the_bar_rate_is_a_window_average_and_its_last_figure_the_runs(capsys):
    """Steps of 128 tokens taking 0.25, 1.25, 0.14 and 1.97 s (each alone 512, 102, 914, 65 tokens/s, the swings
    a per-step rate shows): the bar's rate is tokens over seconds since the window's first step, the ETA the
    tokens left at that rate; after RATE_WINDOW more steps only those count; closed, it shows the invocation's
    average."""
    from types import SimpleNamespace
    now = [10.0]
    run = SimpleNamespace(steps=40, step_tokens=128, args=SimpleNamespace(len=128, quiet=False),
                          config=SimpleNamespace(rope=RopeConfig(theta=1e4, original_max_position_embeddings=64)))
    progress = trainer.Progress(run, 0, trainer.Dist(), clock=lambda: now[0])
    rates = []
    for seconds in (0.25, 1.25, 0.14, 1.97):
        now[0] += seconds
        progress.micro_batch(128)
        progress.step(loss=2.0, lr=1e-3)
        rates.append(progress.rate())
    np.testing.assert_allclose(rates, [128 / 0.25, 256 / 1.5, 384 / 1.64, 512 / 3.61])
    assert progress.bar.postfix == f"142 tok/s, ETA 00:{(40 - 4) * 128 / (512 / 3.61):02.0f}, loss 2.0000, lr 1.00e-03"
    now[0] += 0.5
    progress.micro_batch(64)                                          # half of step 5: counted as it comes
    assert progress.rate() == pytest.approx(576 / 4.11)
    progress.micro_batch(64)
    progress.step(loss=2.0, lr=1e-3)
    for _ in range(trainer.RATE_WINDOW):                              # steps of 2 s: the early ones leave the window
        now[0] += 2.0
        progress.micro_batch(128)
        progress.step(loss=1.0, lr=1e-3)
    assert progress.rate() == 64.0
    progress.close()
    assert progress.average() == pytest.approx(25 * 128 / (4.11 + 40))                  # 72.55
    assert progress.bar.postfix == "72.5 tok/s on average, loss 1.0000, lr 1.00e-03"
    assert trainer.window_rate([(1.0, 5), (1.0, 9)]) is None          # no time yet: no rate


def test_accumulated_gradients_equal_the_full_batch_mean_loss(tiny_llama):
    """Micro-batches + chunked, checkpointed loss vs one full-batch cross-entropy on forward()'s logits."""
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (4, 24))
    model, reference = tiny_llama(seed=3).train(), tiny_llama(seed=3).train()
    model.gradient_checkpointing = True
    nll = accumulate_gradients(model, [(ids[:2],), (ids[2:],)], n_predicted=4 * 23)
    logits = reference(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    loss.backward()
    assert float(nll) / (4 * 23) == pytest.approx(loss.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_optimizer_step_descends_the_clipped_gradient_of_the_mean_loss(tiny_llama):
    """trainer.optimizer_step with plain SGD, whose update shows the gradient: w - lr * g * min(1, clip / |g|), g
    that of one full-batch cross-entropy on forward()'s logits, from two micro-batches of the chunked loss; the lr
    is the one the step is given, and the gradients are cleared after."""
    torch.manual_seed(2)
    ids = torch.randint(0, 97, (4, 24))
    model, reference = tiny_llama(seed=4).train(), tiny_llama(seed=4).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss, norm = trainer.optimizer_step(model, optimizer, [(ids[:1],), (ids[1:],)], 0.1, 4 * 23, clip=0.5)
    logits = reference(ids)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    expected.backward()
    grads = [q.grad for q in reference.parameters()]
    expected_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    assert loss == pytest.approx(expected.item(), rel=1e-6) and norm == pytest.approx(expected_norm, rel=1e-5)
    assert norm > 0.5 and optimizer.param_groups[0]["lr"] == 0.1
    for (name, p), q, g in zip(model.named_parameters(), reference.parameters(), grads):
        assert p.grad is None, name
        torch.testing.assert_close(p, q - 0.1 * g * (0.5 / expected_norm), rtol=1e-5, atol=1e-7, msg=name)


def test_a_non_finite_loss_stops_the_step_before_the_weights_change(tiny_llama):
    model = tiny_llama(seed=4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, 1e-3, (0.9, 0.95), 0.0, torch.device("cpu"))
    poisoned = lambda m, ids: (m.nll(ids)[0] * float("inf"), m.nll(ids)[0])  # noqa: E731
    with pytest.raises(trainer.NonFiniteLoss,
                       match=r"^loss [0-9.]+ \(gradient norm (nan|inf)\): stopped before updating the weights$"):
        trainer.optimizer_step(model, optimizer, [(torch.randint(0, 97, (1, 8)),)], 1e-3, 7, loss_fn=poisoned)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_export_is_safetensors_that_ropelite_and_transformers_load(tmp_path, tiny_llama):
    """export_model writes each file as a header, then one tensor after another: safetensors' own reader gives
    back every weight (in shards with Hugging Face's index past max_shard_bytes; a tied lm_head once, as the
    embedding), ropelite loads the folder strictly, and transformers computes ropelite's logits from it."""
    from transformers import LlamaForCausalLM
    from ropelite.training import export_model
    model, tied = tiny_llama(seed=5), tiny_llama(seed=6, tie_word_embeddings=True)
    export_model(model, model.config, tmp_path / "one", {"note": 1})
    export_model(model, model.config, tmp_path / "sharded", {}, max_shard_bytes=40_000)
    export_model(tied, tied.config, tmp_path / "tied", {})
    head = (tmp_path / "one" / "model.safetensors").read_bytes()
    length = int.from_bytes(head[:8], "little")
    assert length % 8 == 0 and json.loads(head[8:8 + length])["__metadata__"] == {"format": "pt"}
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    expected = {("" if k.startswith("lm_head") else "model.") + k: v for k, v in model.state_dict().items()}
    for folder, names in (("one", ["model.safetensors"]), ("sharded", files)):
        read = {k: v for name in names for k, v in load_file(tmp_path / folder / name).items()}
        assert read.keys() == expected.keys() and all(torch.equal(read[k], expected[k]) for k in read), folder
        assert all(index[k] in names for k in read) or folder == "one"
    assert json.loads((tmp_path / "one" / "config.json").read_text())["note"] == 1
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    ids = torch.randint(0, 97, (1, 20))
    for folder, source in (("sharded", model), ("tied", tied)):
        again = load_model(tmp_path / folder)
        assert all(torch.equal(again.state_dict()[k], v) for k, v in source.state_dict().items())
        theirs = LlamaForCausalLM.from_pretrained(tmp_path / folder).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids).logits, source(ids), rtol=1e-4, atol=1e-4)


def test_a_checkpoint_is_read_strictly(tmp_path, tiny_llama):
    """A tensor the checkpoint lacks, one the model lacks, or a damaged shard: a one-line error naming it."""
    from ropelite.training import checkpoint_state, read_shards, write_shards

    def model_and_optimizer(seed: int):
        model = tiny_llama(seed=seed)
        return model, make_optimizer(model, 1e-3, (0.9, 0.95), 0.0, torch.device("cpu"))

    for name, change in (("missing", lambda m: m.pop("norm.weight")),
                         ("unexpected", lambda m: m.update(extra=torch.zeros(3)))):
        state = checkpoint_state(*model_and_optimizer(1))
        change(state["model"])
        write_shards(state, tmp_path / name)
        with pytest.raises(RopeliteError, match=f"^{tmp_path / name}: {name} tensor "
                                                f"{'norm.weight' if name == 'missing' else 'extra'}$"):
            read_shards(tmp_path / name, *model_and_optimizer(2))
    write_shards(checkpoint_state(*model_and_optimizer(1)), tmp_path / "whole")
    read_shards(tmp_path / "whole", *model_and_optimizer(2))          # the same, undamaged: reads
    shard = tmp_path / "whole" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(RopeliteError, match=f"^cannot read the checkpoint {tmp_path / 'whole'}: "):
        read_shards(tmp_path / "whole", *model_and_optimizer(2))


# ---------------------------------------------------------------- runs

def test_keeping_attention_trains_the_same_weights_bit_for_bit(tmp_path):
    """--keep-attention saves the attention kernel's output instead of recomputing it: the same numbers."""
    for name, extra in (("recompute", []), ("keep", ["--keep-attention"])):
        train.main(TINY + ["--tokens", "512", "--out", str(tmp_path / name), *extra])
    a, b = weights(tmp_path / "recompute"), weights(tmp_path / "keep")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)



def test_resume_is_bit_identical_and_the_folder_records_its_rope(tmp_path):
    args = TINY + ["--rope", "yarn", "--orig-len", "16", "--tokens", "768", "--save-every", "2",  # 6 steps, yarn x2
                   "--eval-every", "2"]
    straight = train.main(args + ["--out", str(tmp_path / "straight")])
    cut = tmp_path / "cut"
    cut.mkdir()   # where a run was killed before its first checkpoint: a new run scores step 0 afresh
    (cut / "eval.jsonl").write_text('{"step": 0, "eval_loss": 9.9}\n')
    train.main(args + ["--out", str(cut), "--stop-after", "3"])
    (cut / "metrics.jsonl").open("a").write('{"step": 4, "loss": 1.0}\n{"step": 5, "lo')  # killed mid-step 5
    # ... and killed mid-save, between the save's two renames: the previous checkpoint is the one to use
    (cut / "checkpoint").rename(cut / ".checkpoint.old")
    (cut / ".checkpoint.tmp").mkdir()
    (cut / ".checkpoint.tmp" / "__0_0.distcp").write_bytes(b"half a file")
    train.main(args + ["--out", str(cut), "--resume", "--stop-after", "1"])
    train.main(["--resume", "--out", str(cut), "--quiet"])   # every other flag from the checkpoint (issue 17.2)

    a, b = weights(straight), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_a, state_b = (checkpoint_tensors(run / "checkpoint", tmp_path / f"{run.name}.pt") for run in (straight, cut))
    opt_a, opt_b = state_a["optimizer"]["state"], state_b["optimizer"]["state"]
    assert len(opt_a) == 21 and opt_a.keys() == opt_b.keys()
    assert all(torch.equal(opt_a[k][m], opt_b[k][m]) for k in opt_a for m in ("exp_avg", "exp_avg_sq", "step"))
    assert all(torch.equal(state_b["model"][k.removeprefix("model.")], b[k]) for k in b)  # the export = the weights
    assert [r["step"] for r in metrics(cut)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in metrics(cut)] == [r["loss"] for r in metrics(straight)]
    assert [r["step"] for r in metrics(cut, "eval.jsonl")] == [0, 2, 4, 6]
    assert metrics(cut, "eval.jsonl") == metrics(straight, "eval.jsonl")
    assert load_trainer_state(cut / "checkpoint")["sequences"] == 6 * 4

    config = json.loads((cut / "config.json").read_text())
    own = config["ropelite"]
    assert (own["rope"], own["factor"], own["theta"], own["original_max_position_embeddings"],
            own["max_position_embeddings"]) == ("yarn", 2.0, 10000.0, 16, 32)
    assert own["trained"]["len"] == 32 and trained_length(cut) == 32 and own["trained"]["tokens"] == 768
    assert (own["trained"]["step"], own["trained"]["steps"], own["trained"]["sequences_per_step"],
            own["trained"]["batch_tokens"], own["trained"]["init"], own["trained"]["data"]) == \
        (6, 6, 4, 128, "random", {"builtin": "prose"})
    assert config["rope_scaling"]["rope_type"] == "yarn" and config["rope_scaling"]["factor"] == 2.0
    assert config["max_position_embeddings"] == 32
    model = load_model(cut)   # the out folder itself is the model
    assert model.config.rope == RopeConfig(type="yarn", theta=1e4, factor=2.0, original_max_position_embeddings=16)
    assert model.config.vocab_size == 257 and model.config.eos_token_id == 256     # bytes + EOS


def test_elapsed_time_runs_on_across_a_resume(tmp_path):
    """metrics.jsonl's elapsed_s is the run's time over every invocation: the checkpoint keeps it and a resumed run
    continues from it, so the rows rise throughout and the last one says how long the run took."""
    out = tmp_path / "run"
    train.main(TINY + ["--tokens", "512", "--eval-tokens", "0", "--out", str(out), "--stop-after", "2"])  # 4 steps
    saved = load_trainer_state(latest_checkpoint(out))["elapsed_s"]
    train.main(["--resume", "--out", str(out)])
    elapsed = [r["elapsed_s"] for r in metrics(out)]
    assert len(elapsed) == 4 and 0 < elapsed[0] < elapsed[1] <= saved < elapsed[2] < elapsed[3]


@pytest.mark.slow
def test_small_runs_from_scratch_take_a_batch_that_fits(tmp_path, capsys):
    """train.py --init random --len 128 --tokens 32768 (and 64Ki), as a new user writes them: the default
    --batch-tokens follows the budget (one line says so) instead of refusing a run smaller than YaRN's step."""
    out = train.main(["--init", "random", "--len", "128", "--tokens", "32768", "--device", "cpu", "--quiet",
                      "--out", str(tmp_path / "run")])
    assert ("budget: --batch-tokens not given, so min(262144, --tokens / 400) in whole sequences of 128, a multiple "
            "of 1 (micro-batch x processes) = 1 sequences = 128 tokens per step") in capsys.readouterr().err
    assert len(metrics(out)) == 256 and json.loads((out / "config.json").read_text())["ropelite"]["trained"][
        "batch_tokens"] == 128
    assert train.main(["--init", "random", "--len", "128", "--tokens", "64Ki", "--dry-run"]) is None
    assert "plan: budget: 512 steps x 1 sequences x 128 tokens = 65,536 tokens" in capsys.readouterr().out


def test_dry_run_plans_without_reading_a_weight_or_writing(tmp_path, capsys, monkeypatch):
    """--dry-run resolves the run and prints its plan: here for a model folder without weights (the real run stops
    at them), under torchrun's WORLD_SIZE = 2, on a CUDA device this machine need not have; it writes nothing. A
    --resume dry run plans from the checkpoint's flags."""
    from ropelite.hf import config_to_hf
    from ropelite.io import write_json
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, eos_token_id=63,
                         rope=RopeConfig(theta=1e4, original_max_position_embeddings=16))
    write_json(tmp_path / "base" / "config.json", config_to_hf(config))               # no weights
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 63, 5000))
    args = ["--model", str(tmp_path / "base"), "--data", str(tmp_path / "tokens.npy"), "--rope", "yarn",
            "--len", "64", "--tokens", "4096", "--micro-batch", "2", "--device", "cuda", "--out", str(tmp_path / "run")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.main(args + ["--dry-run"]) is None
    assert not (tmp_path / "run").exists()
    plan = capsys.readouterr().out.splitlines()
    # parameters: embedding + lm_head 2 x 64 x 32, final norm 32, and per block q, o 32 x 32, k, v 32 x 16,
    # the MLP 3 x 32 x 64, two norms 2 x 32: 4096 + 32 + 2 x 9280 = 22,688
    assert plan[:4] == [
        f"plan: model: {tmp_path / 'base'}, 22,688 parameters: 2 blocks, hidden 32, 4 heads / 2 kv heads of 8, ffn 64, "
        "vocab 64",
        "plan: rope: yarn x4 (theta 10000, L 16 -> len 64)",
        "plan: budget: 16 steps x 4 sequences x 64 tokens = 4,096 tokens; lr 2e-05, warmup 20, then linear",
        "plan: processes: 2 on cuda (FSDP2 shards), 1 micro-batch(es) of 2 each per step, bf16, fp32 weights, "
        "AdamW (fused), grad-ckpt on"]
    assert plan[-2].startswith("plan: attention (bfloat16, cuda): ") and plan[-1].startswith("dry run: nothing")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(RopeliteError, match="^no model.safetensors"):                  # the run itself reads them
        train.main(args[:-4] + ["--device", "cpu", "--out", str(tmp_path / "real")])

    out = tmp_path / "resumable"
    train.main(TINY + ["--tokens", "512", "--out", str(out), "--stop-after", "1"])
    capsys.readouterr()
    before = sorted(p.name for p in out.rglob("*"))
    train.main(["--resume", "--out", str(out), "--dry-run"])
    plan = capsys.readouterr().out
    assert f"plan: out: {out}: resumes {out / 'checkpoint'} at step 1; checkpoint every 50 steps" in plan
    assert "plan: budget: 4 steps x 4 sequences x 32 tokens" in plan and sorted(p.name for p in out.rglob("*")) == before


def test_loss_goes_down_on_learnable_text(tmp_path):
    """Bytes of a repeated sentence: the loss must fall from ln 257 (N(0, 0.02) init) to well below the text's
    unigram entropy, which no model without context can beat; so must the loss on a second, held-out file
    (the training stream needs only the first)."""
    text = "the quick brown fox jumps over the lazy dog. " * 200
    (tmp_path / "a_fox.txt").write_text(text)
    (tmp_path / "b_held_out.txt").write_text("a lazy dog sleeps, then the brown fox jumps over it. " * 50)
    counts = np.unique(np.frombuffer(text.encode(), dtype=np.uint8), return_counts=True)[1] / len(text)
    unigram = float(-(counts * np.log(counts)).sum())                                         # 3.05 nats
    out = train.main(TINY + ["--data", str(tmp_path / "a_fox.txt"), str(tmp_path / "b_held_out.txt"),
                             "--tokens", "2560", "--lr", "1e-2", "--schedule", "constant", "--save-every", "0",
                             "--eval-every", "10", "--out", str(tmp_path / "run")])
    losses = [r["loss"] for r in metrics(out)]                                               # 20 steps
    assert losses[0] == pytest.approx(np.log(257), abs=0.05)
    assert max(losses[-3:]) < unigram / 2
    held_out = metrics(out, "eval.jsonl")
    assert [r["step"] for r in held_out] == [0, 10, 20] and held_out[0]["eval_tokens"] == 128
    assert held_out[0]["eval_loss"] == pytest.approx(np.log(257), abs=0.05)
    assert held_out[-1]["eval_loss"] < held_out[0]["eval_loss"] - 1.0
    # 4 held-out sequences of 32: each loss has its interval over them, and the ppl is the loss's exp
    for r in held_out:
        assert r["eval_loss_n"] == 4 and r["eval_loss_low"] <= r["eval_loss"] <= r["eval_loss_high"]
        assert r["eval_ppl"] == pytest.approx(np.exp(r["eval_loss"]))
        assert r["eval_ppl_low"] == pytest.approx(np.exp(r["eval_loss_low"]))
    summary, = read_summaries(out)
    assert summary["results"] == "train" and summary["numbers"]["steps"] == 20
    assert "lower, the intervals separate" in summary["finding"][0]


@pytest.mark.slow
def test_sharded_checkpoints_resume_on_two_processes_and_on_one(tmp_path):
    """torchrun, 2 CPU processes (gloo), the same global batch as 1 process: the same losses and weights as 1
    process, to float rounding. A 2-process run stopped after step 2 leaves one shard file per process, each about
    half the state (no process gathered it); resumed on 2 processes it ends bit for bit as the uninterrupted
    2-process run, and resumed on 1 (DCP reshards) within 1e-7 of it: there steps 3-4 sum the 4 micro-batches'
    gradients in another order ((g1 + g2) + g3) + g4 on 1 process, (g1 + g2) + (g3 + g4) over 2, and the
    clipping norm over shards), which moves the last bits of fp32. A tied-embedding 'pretrained' model with no
    tokenizer and token-id data."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                         eos_token_id=63, rope=RopeConfig(theta=1e4, original_max_position_embeddings=16))
    save_model(Llama(config), tmp_path / "base")
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 63, 2000))
    np.save(tmp_path / "tokens_held_out.npy", np.random.default_rng(1).integers(0, 63, 500))
    args = ["--model", str(tmp_path / "base"), "--data", str(tmp_path / "tokens.npy"),
            str(tmp_path / "tokens_held_out.npy"), "--eval-every", "2", "--rope", "pi",
            "--len", "32", "--tokens", "512", "--batch-tokens", "128", "--lr", "1e-3", "--warmup", "1",
            "--device", "cpu", "--dtype", "fp32", "--quiet", "--save-every", "0"]                 # 4 steps of 4

    def torchrun(out: Path, *extra: str) -> None:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", str(ROOT / "train.py"), *args, "--out", str(out), *extra],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]

    one = train.main(args + ["--out", str(tmp_path / "one")])
    two, on_two, on_one = tmp_path / "two", tmp_path / "two-2-2", tmp_path / "two-2-1"
    torchrun(two)
    torchrun(on_two, "--stop-after", "2")
    shards = sorted((on_two / "checkpoint").glob("*.distcp"))
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"]
    sizes = [p.stat().st_size for p in shards]
    assert max(sizes) < 0.7 * sum(sizes)
    shutil.copytree(on_two, on_one)
    torchrun(on_two, "--resume")
    train.main(["--resume", "--out", str(on_one), "--quiet"])

    for run in (two, on_two, on_one):
        assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    assert json.loads((on_one / "checkpoint" / "trainer_state.json").read_text())["processes"] == 1
    np.testing.assert_allclose([r["loss"] for r in metrics(two)], [r["loss"] for r in metrics(one)], atol=1e-5)
    assert metrics(on_two, "eval.jsonl") == metrics(two, "eval.jsonl")
    assert [r["loss"] for r in metrics(on_two)] == [r["loss"] for r in metrics(two)]
    evals = [metrics(run, "eval.jsonl") for run in (one, two, on_one)]
    assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]] == [r["step"] for r in evals[2]] == [0, 2, 4]
    np.testing.assert_allclose([r["eval_loss"] for r in evals[1]], [r["eval_loss"] for r in evals[0]], atol=1e-5)
    a, b, c, d = weights(one), weights(two), weights(on_two), weights(on_one)
    assert a.keys() == b.keys() == c.keys() == d.keys() and "lm_head.weight" not in a   # tied: saved once
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
        assert torch.equal(c[k], b[k]), k                                  # 2 -> 2: bit for bit
        torch.testing.assert_close(d[k], b[k], rtol=0, atol=1e-7)          # 2 -> 1: the reduction order


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("extra, message", [
    (["--rope", "yarn", "--factor", "0.5"], r"^rope factor must be >= 1 \(extension, not compression\), got 0.5$"),
    (["--tokens", "100"], "less than one optimizer step"),
    (["--batch-tokens", "16"], "less than one sequence"),
    (["--data", "/no/such/file.txt"], "data not found"),
    (["--micro-batch", "3"], "do not split into micro-batches"),
    (["--base", "1e6"], "^a new base is an NTK setting; rope 'rope' does not take one$"),   # the model's own rope
    (["--rope", "pi", "--base", "1e6"], "^a new base is an NTK setting; rope 'pi' does not take one$"),
    (["--no-grad-ckpt", "--keep-attention"], "^--keep-attention keeps attention under --grad-ckpt"),
])
def test_bad_flags_are_one_line_errors(tmp_path, extra, message):
    with pytest.raises(RopeliteError, match=message):
        train.main(TINY + ["--tokens", "256", "--out", str(tmp_path / "run"), *extra])


def test_pretokenised_ids_outside_the_vocabulary_are_one_line(tmp_path):
    """A token file made with another vocabulary: named, not an IndexError in the embedding (issue 16)."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, eos_token_id=63,
                         rope=RopeConfig(theta=1e4, original_max_position_embeddings=16))
    save_model(Llama(config), tmp_path / "base")
    np.save(tmp_path / "tokens.npy", np.array([1, 2, 70, 3] * 100))
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(tmp_path / "base"), "--data",
                           str(tmp_path / "tokens.npy"), "--len", "32", "--tokens", "128", "--batch-tokens", "128",
                           "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    *notes, err = done.stderr.strip().splitlines()
    assert err == "error: token id 70 outside the model's vocabulary (64 ids)"
    # the error comes last; before it at most one line, --dtype auto's
    assert len(notes) <= 2 and all(n.startswith(("dtype: ", "rope: --factor not given")) for n in notes)


def test_unwritable_out_and_run_folder_checks(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RopeliteError, match="cannot write to --out"):
        train.main(TINY + ["--tokens", "256", "--out", str(tmp_path / "file" / "run")])
    with pytest.raises(RopeliteError, match="nothing to resume"):
        train.main(TINY + ["--tokens", "256", "--out", str(tmp_path / "empty"), "--resume"])
    out = str(tmp_path / "run")
    train.main(TINY + ["--tokens", "256", "--out", out])
    with pytest.raises(RopeliteError, match="already holds a run"):
        train.main(TINY + ["--tokens", "256", "--out", out])
    with pytest.raises(RopeliteError, match="--lr is 0.1 but the run in --out was started with 0.003"):
        train.main(TINY + ["--tokens", "256", "--out", out, "--resume", "--lr", "0.1"])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        nll = accumulate_gradients(*args, **kwargs)
        return nll * float("nan") if len(calls) == 3 else nll

    monkeypatch.setattr(trainer, "accumulate_gradients", poisoned)
    out = tmp_path / "run"
    with pytest.raises(RopeliteError, match=r"^step 3: loss nan \(gradient norm [0-9.]+\): stopped before updating "
                                            r"the weights; the last good checkpoint is .* \(step 2\)$"):
        train.main(TINY + ["--tokens", "640", "--save-every", "1", "--out", str(out)])
    assert load_trainer_state(latest_checkpoint(out))["step"] == 2
    kept = checkpoint_tensors(latest_checkpoint(out), tmp_path / "kept.pt")
    assert all(torch.isfinite(t).all() for t in kept["model"].values())
    assert [r["step"] for r in metrics(out)] == [1, 2]


def test_command_line_error_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "--rope", "pi", "--factor", "0.5",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: rope factor must be >= 1 (extension, not compression), "
                                                "got 0.5"]   # RopeConfig's rule and message


def test_resume_takes_the_checkpoint_flags_and_refuses_other_ones(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(TINY + ["--tokens", "512", "--wd", "0.1", "--no-grad-ckpt", "--out", out, "--stop-after", "1"])
    capsys.readouterr()
    with pytest.raises(RopeliteError, match=r"^--tokens is 1024 but the run in --out was started with 512; "
                                            r"--resume takes the run's flags itself: leave it out$"):
        train.main(["--resume", "--out", out, "--tokens", "1024"])
    train.main(["--resume", "--out", out, "--stop-after", "1", "--save-every", "1", "--len", "32"])  # equal: fine
    taken = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resume: from the checkp")]
    # the flags of TINY and the first run that differ from the defaults, but --len (given), --device and --quiet
    # (this invocation's own)
    assert taken == ["resume: from the checkpoint: --dtype fp32 --tokens 512 --batch-tokens 128 --micro-batch 2 "
                     "--lr 0.003 --warmup 2 --wd 0.1 --no-grad-ckpt --builtin prose --init random --layers 2 "
                     "--hidden 32"]
    assert load_trainer_state(latest_checkpoint(tmp_path / "run"))["args"]["save_every"] == 1


def test_first_sigterm_saves_and_resume_is_bit_identical(tmp_path):
    """SIGTERM in the middle of step 3 (a subprocess signals itself from inside the step's first micro-batch): the
    step finishes, the checkpoint is written, exit 143 with the resume command; --resume alone then ends with the
    same bytes as a run never interrupted. A second signal in the same step kills at once, without a save."""
    args = TINY + ["--tokens", "640", "--save-every", "0", "--eval-tokens", "0"]                 # 5 steps
    straight = train.main(args + ["--out", str(tmp_path / "straight")])

    def run_signalled(out, kills):
        script = (f"import os, signal, sys; sys.path.insert(0, {str(ROOT)!r}); import train; "
                  "from ropelite import trainer; from ropelite.cli import run_script; calls = []; "
                  "real = trainer.accumulate_gradients\n"
                  "def signalled(*a, **k):\n    calls.append(1)\n    if len(calls) == 3:\n"
                  f"        for _ in range({kills}): os.kill(os.getpid(), signal.SIGTERM)\n"
                  "    return real(*a, **k)\n"
                  f"trainer.accumulate_gradients = signalled; run_script(lambda: train.main({args + ['--out', str(out)]!r}))")
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)

    done = run_signalled(tmp_path / "cut", kills=1)
    assert done.returncode == 143, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"train: stopped by SIGTERM after step 3 of 5, saved in {tmp_path / 'cut' / 'checkpoint'}; "
        f"continue with: train.py --resume --out {tmp_path / 'cut'}")
    assert load_trainer_state(latest_checkpoint(tmp_path / "cut"))["step"] == 3
    train.main(["--resume", "--out", str(tmp_path / "cut")])
    assert (straight / "model.safetensors").read_bytes() == (tmp_path / "cut" / "model.safetensors").read_bytes()
    assert [r["loss"] for r in metrics(tmp_path / "cut")] == [r["loss"] for r in metrics(straight)]

    killed = run_signalled(tmp_path / "killed", kills=2)
    assert killed.returncode == -15 and latest_checkpoint(tmp_path / "killed") is None


def test_a_second_run_on_a_locked_out_fails_in_one_line_and_the_first_finishes(tmp_path, monkeypatch):
    """While this process trains into --out (its step 2), a second train.py on the same --out is started: it stops
    in one line naming this process, and the first run's logs and model come out whole."""
    out, calls, second = tmp_path / "run", [], []

    def with_a_second_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            second.append(subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "--tokens", "512",
                                          "--out", str(out)], capture_output=True, text=True, timeout=120))
        return accumulate_gradients(*args, **kwargs)

    monkeypatch.setattr(trainer, "accumulate_gradients", with_a_second_run)
    train.main(TINY + ["--tokens", "512", "--out", str(out)])
    assert second[0].returncode == 2
    assert second[0].stderr.strip().splitlines() == [
        f"error: --out {out} is in use by another run (pid {os.getpid()}); wait for it to end or choose another --out"]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert load_trainer_state(latest_checkpoint(out))["step"] == 4 and (out / ".lock").read_text() == f"{os.getpid()}\n"


def test_saved_files_have_plain_write_permissions_and_the_byte_tokenizer(tmp_path):
    """Every file of a run has the mode a plain open() gives under this umask (0644 under 022, not mkstemp's
    0600); a random-init text model carries its tokenizer, so ropelite.load gives one that round-trips text."""
    import ropelite
    out = train.main(TINY + ["--tokens", "256", "--save-every", "1", "--out", str(tmp_path / "run")])
    (tmp_path / "plain").write_text("x")
    plain = (tmp_path / "plain").stat().st_mode & 0o777
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.relative_to(out).as_posix() for p in files}
    assert {"model.safetensors", "config.json", "tokenizer_config.json", "metrics.jsonl", "eval.jsonl",
            "checkpoint/__0_0.distcp", "checkpoint/.metadata", "checkpoint/trainer_state.pt",
            "checkpoint/config.json"} <= names
    assert {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in files} == dict.fromkeys(names, plain)
    mask = os.umask(0o022)
    os.umask(mask)   # reading the umask means setting it
    assert mask != 0o022 or plain == 0o644
    model, tokenizer = ropelite.load(str(out))
    text = "héllo, wörld 世界 🎉\n\ttabs and <|endoftext|> stay bytes"
    assert tokenizer.encode(text) == ByteTokenizer().encode(text) == list(text.encode())
    assert tokenizer.decode(tokenizer.encode(text) + [256]) == text and tokenizer.eos_id == 256
    assert model.config.vocab_size == 257


def test_byte_tokenizer_config_is_checked(tmp_path):
    from ropelite.tokenizer import load_tokenizer
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**ByteTokenizer.config(), "eos_token_id": 0}))
    with pytest.raises(RopeliteError, match="ByteTokenizer with eos_token_id = 0, but ropelite's has 256"):
        load_tokenizer(tmp_path)


def test_notices_derived_factor_short_warmup_long_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer, "DAY_S", 1e-9)   # any run is "long": the notice of the first micro-batch shows
    train.main(TINY + ["--rope", "yarn", "--orig-len", "16", "--tokens", "256", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert ("rope: --factor not given, so s = max(1, len / L) = max(1, 32 / 16) = 2; a run at another --len "
            "trains another RoPE: give --factor to compare lengths") in err.splitlines()
    assert "warning: the run has 2 steps, no more than --warmup 2: its largest lr is 0.0015, never --lr 0.003" in err
    assert "notice: at the first micro-batch's" in err and "days more on cpu" in err
    train.main(TINY + ["--rope", "yarn", "--orig-len", "16", "--factor", "2", "--tokens", "256",
                       "--out", str(tmp_path / "given")])
    assert "--factor not given" not in capsys.readouterr().err


def test_more_than_one_epoch_needs_the_flag(tmp_path):
    (tmp_path / "small.txt").write_text("a small corpus. " * 40)            # 640 bytes + EOS = 641 tokens
    args = TINY + ["--data", str(tmp_path / "small.txt"), "--tokens", "1280", "--eval-tokens", "0"]
    with pytest.raises(RopeliteError, match=r"^the budget of 1,280 tokens would read the training data \(641 "
                                            r"tokens\) 2.00 times \(2 epochs\): pass --data with at least 1,280 "
                                            r"tokens of text, lower --tokens, or pass --epochs-ok"):
        train.main(args + ["--out", str(tmp_path / "run")])
    train.main(args + ["--epochs-ok", "--out", str(tmp_path / "run")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a GPU")
def test_device_cuda_without_cuda_is_one_line(tmp_path):
    with pytest.raises(RopeliteError, match=r"^--device cuda: .*; use --device cpu$"):
        train.main(TINY + ["--tokens", "256", "--device", "cuda", "--out", str(tmp_path / "run")])


def test_sync_every_micro_batch_reaches_the_step(tmp_path, monkeypatch):
    """--sync-every-micro-batch is handed to FSDP's sync context of every step (parallel.py's tests check what it
    does on 2 processes); a --resume may turn it on or off, since the gradients are the same sum."""
    seen = []
    real = trainer.sync_on_last_micro_batch

    def spy(model, n, every=False):
        seen.append((n, every))
        return real(model, n, every)

    monkeypatch.setattr(trainer, "sync_on_last_micro_batch", spy)
    out = tmp_path / "run"
    train.main(TINY + ["--tokens", "256", "--save-every", "1", "--stop-after", "1", "--eval-tokens", "0",
                       "--out", str(out)])
    train.main(["--resume", "--out", str(out), "--sync-every-micro-batch", "--quiet"])
    assert seen == [(2, False), (2, True)]
