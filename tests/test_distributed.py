"""Scale-out on torch.distributed, on the CPU with gloo and 2 processes (torchrun):

- DDP and FSDP2 train exactly like one process with the same global batch (same loss curve);
- sharded (DCP) checkpoints resume at another world size (2 -> 1 and 1 -> 2) and continue the run;
- only rank 0 writes logs and plots; consolidation gives a model.safetensors generation can read;
- the meta-device build materializes only this rank's shards, with the single-process initial weights;
- clear errors for a batch the world size does not divide, a missing backend, a different model.

MoE balancing losses are batch statistics (the mean router probability per expert), so with them on,
2 x B rows and 1 x 2B rows give different gradients by design; the curve comparisons turn them off.
"""

import json
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from nanomoe.cli import main
from nanomoe.data import prepare_data
from nanomoe.errors import CheckpointError, ConfigError
from nanomoe.generation import generate
from nanomoe.model import GPT
from nanomoe.parallelize import parallelize
from nanomoe.params import count_parameters, memory_estimate
from nanomoe.presets import get_preset
from nanomoe.runtime import DistContext, micro_batch_size
from nanomoe.training import checkpoint as ckpt
from nanomoe.training.checkpoint import read_sharded_model_state
from nanomoe.training.config import TrainConfig

pytestmark = pytest.mark.distributed

STEPS = 6
# 6 steps of 2 accumulated micro-batches, evaluated and saved at steps 3 and 6, in fp32 so runs can be
# compared to 1e-5. The global batch is 8 sequences: 1 process x 4 x 2 micro-steps, or 2 x 2 x 2.
COMMON = [
    "--preset", "debug", "--max-steps", str(STEPS), "--no-progress", "--set", "grad_accum=2",
    "--set", "block_size=32", "--set", "aux_loss_coef=0", "--set", "precision=fp32",
    "--set", "eval_every=3", "--set", "eval_batches=2", "--set", "log_every=1", "--set", "samples=0",
    "--set", "plots=false", "--set", "tensorboard=false", "--set", "lr=3e-3",
]


def torchrun(*args, nproc=2, timeout=180):
    """`torchrun --standalone --nproc_per_node=2 -m nanomoe ...` (a free port is picked for us)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nanomoe", *map(str, args)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, failure(cmd, proc)
    return proc


def failure(cmd, proc) -> str:
    """The workers' output without torch's per-line launcher warnings, for the assertion message."""
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if not re.match(r"^[WI]\d{4} ", line)]
    return f"{' '.join(map(str, cmd))} failed (exit {proc.returncode}):\n" + "\n".join(lines)[-8000:]


def train_losses(run_dir) -> dict[int, float]:
    """Training loss per step (the last entry wins, so a resumed run shows the resumed steps)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(run_dir, prefer="latest").model.state_dict()


def assert_same_run(run, reference, steps=range(1, STEPS + 1)):
    losses, expected = train_losses(run), train_losses(reference)
    for step in steps:
        assert losses[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}"
    mine, ref = final_weights(run), final_weights(reference)
    assert mine.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(mine[name], ref[name], atol=2e-5, rtol=1e-4, msg=name)


def rewind_to_step_3(run_dir, copy_to):
    """A copy of the run as if it had stopped after step 3 (later checkpoints removed)."""
    shutil.copytree(run_dir, copy_to)
    shutil.rmtree(copy_to / "checkpoints" / "step-00000006")
    for pointer in ("latest", "best"):
        (copy_to / f"{pointer}.json").write_text(json.dumps({"checkpoint": "checkpoints/step-00000003", "step": 3}))
    return copy_to


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "stories"
    return prepare_data("builtin:0.4", out, vocab_size=512, progress=False)


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory):
    """The reference: one process, micro-batches of 4."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(["train", *COMMON, "--data", str(data_dir), "--out", str(out), "--set", "batch_size=4"]) == 0
    return out


@pytest.fixture(scope="module")
def fsdp_run(data_dir, tmp_path_factory):
    """2 processes x micro-batches of 2 with FSDP2 and activation checkpointing; tensorboard and plots
    on, to see who writes them."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    proc = torchrun("train", *COMMON, "--data", data_dir, "--out", out, "--strategy", "fsdp", "--set", "batch_size=2",
                    "--set", "activation_checkpointing=true",
                    "--set", "plots=true", "--set", "tensorboard=true", "--set", "samples=1",
                    "--set", "sample_tokens=8")
    return out, proc


def test_ddp_matches_one_process_with_the_same_global_batch(data_dir, single_run, tmp_path):
    # with activation checkpointing, and gradient sync skipped on the first micro-step (no_sync)
    out = tmp_path / "ddp"
    torchrun("train", *COMMON, "--data", data_dir, "--out", out, "--strategy", "ddp", "--set", "batch_size=2",
             "--set", "activation_checkpointing=true")
    assert (out / "checkpoints" / "step-00000006" / "model.safetensors").is_file()  # rank 0's single file
    assert_same_run(out, single_run)


def test_ddp_with_muon_matches_one_process(data_dir, tmp_path):
    # every rank orthogonalizes the same all-reduced gradients: DDP changes nothing for Muon but the
    # gradients' summation order, whose last bits Muon's bf16 iteration and Adam's first steps (which
    # move a weight by about lr whatever its gradient's size) amplify: the losses agree to 1e-5, the
    # weights to well within one step's size
    muon = ["--set", "optimizer=muon", "--max-steps", "3"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["train", *COMMON, *muon, "--data", str(data_dir), "--out", str(single), "--set", "batch_size=4"]) == 0
    torchrun("train", *COMMON, *muon, "--data", data_dir, "--out", ddp, "--strategy", "ddp", "--set", "batch_size=2")
    losses, expected = train_losses(ddp), train_losses(single)
    assert len(expected) == 3
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}"
    mine, ref = final_weights(ddp), final_weights(single)
    for name in ref:
        torch.testing.assert_close(mine[name], ref[name], atol=3e-3, rtol=0, msg=name)  # lr = 3e-3


def test_fsdp_matches_one_process_with_the_same_global_batch(fsdp_run, single_run):
    run, _ = fsdp_run
    sharded = run / "checkpoints" / "step-00000006" / ckpt.SHARDED_DIR
    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank
    assert not (sharded.parent / "model.safetensors").exists()
    assert_same_run(run, single_run)  # load_checkpoint reads the shards in this one process


def test_only_rank_0_writes_logs_plots_and_samples(fsdp_run):
    run, proc = fsdp_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["kind"] == "train"]
    eval_steps = [r["step"] for r in rows if r["kind"] == "eval"]
    assert train_steps == list(range(1, STEPS + 1)) and eval_steps == [3, 6]  # no rank wrote twice
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (run / "plots" / "loss.png").is_file() and (run / "run.json").is_file()
    assert proc.stdout.count("step 6 | val loss") == 1
    assert proc.stdout.count("--- story 1 ---") == 1  # every rank gathered the weights, rank 0 sampled
    printed = proc.stdout.split("--- story 1 ---\n", 1)[1].split("\n\nfinal validation loss", 1)[0].strip()
    final = ckpt.load_checkpoint(run, prefer="latest")  # the same weights, read from the shards
    ids = final.tokenizer.encode("Once upon a time")
    out = generate(final.model, torch.tensor([ids]), 8, temperature=0.8, top_k=50, stop_id=final.tokenizer.eot_id,
                               seed=0)[0, len(ids):].tolist()
    out = out[: out.index(final.tokenizer.eot_id)] if final.tokenizer.eot_id in out else out
    assert printed == ("Once upon a time" + final.tokenizer.decode(out)).strip()
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []


def test_fsdp_checkpoint_resumes_on_one_process(fsdp_run, single_run, tmp_path):
    run = rewind_to_step_3(fsdp_run[0], tmp_path / "run")
    assert main(["train", "--resume", str(run), "--strategy", "single", "--no-progress"]) == 0
    assert_same_run(run, single_run, steps=range(4, STEPS + 1))
    assert (run / "checkpoints" / "step-00000006" / "model.safetensors").is_file()  # saved by 1 process


def test_fsdp_checkpoint_resumes_on_two_with_fsdp(fsdp_run, single_run, tmp_path):
    run = rewind_to_step_3(fsdp_run[0], tmp_path / "run")
    torchrun("train", "--resume", run, "--no-progress")
    assert_same_run(run, single_run, steps=range(4, STEPS + 1))


def test_one_process_checkpoint_resumes_on_two_with_fsdp(single_run, tmp_path):
    run = rewind_to_step_3(single_run, tmp_path / "run")
    torchrun("train", "--resume", run, "--strategy", "fsdp", "--no-progress")
    assert (run / "checkpoints" / "step-00000006" / ckpt.SHARDED_DIR / ".metadata").is_file()
    assert_same_run(run, single_run, steps=range(4, STEPS + 1))


def test_resume_at_the_same_world_size_restores_every_ranks_random_stream(data_dir, tmp_path):
    # with dropout each rank draws its own masks; a resume that restored only rank 0's stream would
    # give rank 1 other masks from step 4 on, and other weights
    dropout = ["--data", data_dir, "--strategy", "ddp", "--set", "batch_size=2", "--set", "dropout=0.2"]
    straight = tmp_path / "straight"
    torchrun("train", *COMMON, *dropout, "--out", straight)
    run = rewind_to_step_3(straight, tmp_path / "resumed")
    torchrun("train", "--resume", run, "--no-progress")
    assert_same_run(run, straight, steps=range(4, STEPS + 1))


def test_consolidate_writes_safetensors_that_generation_reads(fsdp_run, tmp_path, capsys):
    run, _ = fsdp_run
    out = tmp_path / "final"
    assert main(["checkpoint", "consolidate", str(run), "--out", str(out)]) == 0
    consolidated = ckpt.load_checkpoint(out)
    sharded = ckpt.load_checkpoint(run)
    assert consolidated.step == sharded.step == STEPS
    for name, value in sharded.model.state_dict().items():
        assert torch.equal(consolidated.model.state_dict()[name], value), name
    ids = consolidated.tokenizer.encode("Once upon a time")
    assert generate(consolidated.model, torch.tensor([ids]), 5, seed=0).shape == (1, len(ids) + 5)
    # never overwrite a directory that holds something
    assert main(["checkpoint", "consolidate", str(run), "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err


def test_a_sharded_checkpoint_of_another_model_is_refused(fsdp_run):
    ckpt_dir = ckpt.resolve_checkpoint(fsdp_run[0])
    other = ckpt.read_model_config(ckpt_dir).replace(n_embd=32)
    with pytest.raises(CheckpointError, match="different model"):
        read_sharded_model_state(ckpt_dir, other)


SHARDED_INIT_WORKER = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from nanomoe.parallelize import build_model
    from nanomoe.presets import get_preset
    from nanomoe.runtime import DistContext
    from nanomoe.training.config import TrainConfig
    from nanomoe.training.trainer import optimizer_param_groups

    ctx = DistContext.from_env("cpu")
    # moe-3b's architecture (GQA, 8 experts top-2, tied embeddings here) at a width a test can afford
    cfg = get_preset("moe-3b", vocab_size=512, block_size=32, n_layer=2, n_head=4, n_kv_head=1, n_embd=64,
                     expert_hidden=96, tie_embeddings=True)
    model = build_model(cfg, TrainConfig(strategy="fsdp", precision="fp32", seed=5), ctx, torch.device("cpu"))
    params = dict(model.named_parameters())
    local = {n: p.to_local() for n, p in params.items()}
    full = {n: p.full_tensor() for n, p in params.items()}  # collective: every rank gathers
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.1), lr=1e-3)
    x = torch.randint(0, 512, (2, 32))
    model(x, x).loss.backward()
    opt.step()
    state_numel = sum(t.to_local().numel() for s in opt.state.values() for t in s.values()
                      if isinstance(t, DTensor))
    result = {
        "all_dtensor": all(isinstance(p, DTensor) for p in params.values()),
        "tied": model.lm_head.weight is model.tok_emb.weight,
        "local_numel": sum(t.numel() for t in local.values()),
        "grad_numel": sum(p.grad.to_local().numel() for p in params.values()),
        "optimizer_numel": state_numel,
    }
    if ctx.rank == 0:
        torch.save({n: t.clone() for n, t in full.items()}, sys.argv[1])
    out = [None] * ctx.world_size
    dist.all_gather_object(out, result)
    if ctx.rank == 0:
        json.dump(out, open(sys.argv[2], "w"))
    ctx.shutdown()
""")


def test_fsdp_materializes_only_its_shards_with_the_single_process_init(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(SHARDED_INIT_WORKER)
    weights, report = tmp_path / "full.pt", tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(weights), str(report)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, failure(cmd, proc)
    ranks = json.loads(report.read_text())

    cfg = get_preset("moe-3b", vocab_size=512, block_size=32, n_layer=2, n_head=4, n_kv_head=1, n_embd=64,
                     expert_hidden=96, tie_embeddings=True)
    total = count_parameters(cfg).total
    for r in ranks:
        assert r["all_dtensor"] and r["tied"]
        assert abs(r["local_numel"] - total / 2) < 0.05 * total  # half the model each (rows split by chunk)
        assert r["grad_numel"] == r["local_numel"]
        assert r["optimizer_numel"] == 2 * r["local_numel"]  # AdamW exp_avg + exp_avg_sq, sharded
    assert sum(r["local_numel"] for r in ranks) == total
    # the per-GPU estimate of nanomoe params: fp32 weights + grads + AdamW = 16 bytes / parameter / GPU
    estimate = memory_estimate(cfg, batch_size=1, gpus=2)["fp32"]
    sharded_state = (estimate["weights"] + estimate["gradients"] + estimate["optimizer"]) / 2
    measured = 16 * max(r["local_numel"] for r in ranks)
    assert measured == pytest.approx(sharded_state, rel=0.05)
    assert max(r["local_numel"] for r in ranks) == estimate["fsdp_shard_params"]  # dim-0 shards, exactly

    # the sharded build starts from the weights a single process builds from the same seed
    from nanomoe.parallelize import build_model

    single = build_model(cfg, TrainConfig(precision="fp32", seed=5), DistContext(), torch.device("cpu"))
    gathered = torch.load(weights, weights_only=True)
    for name, value in single.named_parameters():
        assert torch.equal(gathered[name], value.detach()), name


def test_moe_3b_builds_on_the_meta_device_without_memory():
    cfg = get_preset("moe-3b")
    with torch.device("meta"):
        model = GPT(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert model.num_params() == count_parameters(cfg).total > 2.5e9


def test_world_size_that_does_not_divide_the_global_batch_is_refused():
    cfg = TrainConfig(global_batch_size=10, grad_accum=2)
    assert micro_batch_size(cfg, 1) == 5 and micro_batch_size(TrainConfig(batch_size=3), 4) == 3
    with pytest.raises(ConfigError, match="global_batch_size 10 is not divisible.*= 8.*global_batch_size=8 or 16"):
        micro_batch_size(cfg, world_size=4)


def test_strategies_need_the_right_number_of_processes(data_dir, tmp_path, capsys):
    model = GPT(get_preset("debug"))
    with pytest.raises(ConfigError, match="torchrun"):
        parallelize(model, TrainConfig(strategy="fsdp"), DistContext(), torch.device("cpu"))
    with pytest.raises(ConfigError, match="--strategy ddp or --strategy fsdp"):
        parallelize(model, TrainConfig(strategy="single"), DistContext(rank=0, world_size=2), torch.device("cpu"))
    assert main(["train", *COMMON, "--data", str(data_dir), "--out", str(tmp_path / "r"), "--strategy", "ddp"]) == 1
    assert "needs several processes" in capsys.readouterr().err


def test_missing_backend_or_launcher_variables_are_clear_errors(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR.*torchrun"):
        DistContext.from_env("cpu")
    monkeypatch.setattr(dist, "is_gloo_available", lambda: False)
    with pytest.raises(ConfigError, match="gloo backend is missing"):
        DistContext.from_env("cpu")
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(ConfigError, match="nccl backend is missing"):
        DistContext.from_env("cuda")
