"""Muon for the hidden matrices (each expert's matrices on their own), AdamW for the rest: one step
against a plain reference, exact resume, and clear refusals."""

import re

import pytest
import torch

from nanomoe import kernels
from nanomoe.data import prepare_data
from nanomoe.errors import CheckpointError, ConfigError
from nanomoe.model import GPT
from nanomoe.moe import GroupedExperts
from nanomoe.presets import get_preset
from nanomoe.training.config import TrainConfig
from nanomoe.training.optimizers import Muon, MuonWithAdamW, build_optimizer, hidden_matrices
from nanomoe.training.trainer import Trainer

# the matrices Muon must take, by name: attention, the dense FFN, the shared expert, the routed experts
HIDDEN = re.compile(r"blocks\.\d+\.(attn\.(qkv|proj)|ffn\.(fc|proj)|ffn\.shared_expert\.(fc|proj))\.weight"
                    r"|blocks\.\d+\.ffn\.experts\.(w_in|w_out)")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "stories"
    return prepare_data("builtin:0.4", out, vocab_size=512, progress=False)


def tiny_model(**changes):
    # layer 0 dense, layer 1 MoE with a shared expert: every kind of hidden matrix
    return get_preset("debug", **{"vocab_size": 512, "block_size": 32, "moe_every": 2, "n_shared_experts": 1,
                                  **changes})


def quiet(**changes) -> TrainConfig:
    base = dict(batch_size=4, max_steps=6, eval_every=1000, eval_batches=2, save_every=0, log_every=1000,
                samples=0, tensorboard=False, plots=False, progress=False, precision="fp32", seed=3,
                optimizer="muon")
    return TrainConfig(**{**base, **changes})


def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Jordan's quintic Newton-Schulz iteration (https://kellerjordan.github.io/posts/muon/), in fp32
    math rounded to bf16 where the reference implementation keeps bf16 tensors."""
    a, b, c = 3.4445, -4.7750, 2.0315
    bf16 = lambda t: t.bfloat16().float()  # noqa: E731
    tall = G.shape[0] > G.shape[1]
    X = bf16(G.T if tall else G)
    X = bf16(X / bf16(X.norm()).clamp(min=1e-7))
    for _ in range(steps):
        A = bf16(X @ X.T)
        B = bf16(b * A + c * (A @ A))
        X = bf16(a * X + B @ X)
    return X.T if tall else X


def muon_update(G: torch.Tensor, momentum: float, ns_steps: int = 5) -> torch.Tensor:
    """The first step's orthogonalized Nesterov update of one matrix (momentum buffer starts at 0)."""
    buf = (1 - momentum) * G
    return newton_schulz(G + momentum * (buf - G), ns_steps)


def test_hidden_matrices_are_the_blocks_projections_and_experts():
    model = GPT(tiny_model())
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = {names[id(p)] for p in hidden_matrices(model)}
    assert chosen == {n for n in names.values() if HIDDEN.fullmatch(n)}
    assert not any("router" in n or "emb" in n or "lm_head" in n or "norm" in n for n in chosen)


def test_each_slice_of_a_stacked_expert_weight_is_one_experts_matrix():
    # Muon orthogonalizes w_in[e] and w_out[e] as expert e's matrices: if the layout ever changes
    # (experts along another dim), this fails before Muon silently mixes experts
    torch.manual_seed(0)
    experts = GroupedExperts(4, 8, 16, "swiglu", bias=False, kernels=kernels.get("torch"))
    torch.nn.init.normal_(experts.w_in)
    torch.nn.init.normal_(experts.w_out)
    x = torch.randn(5, 8)
    before = [experts.expert_forward(x, e) for e in range(4)]
    assert experts.w_in.shape[0] == experts.w_out.shape[0] == 4
    with torch.no_grad():
        experts.w_in[2].mul_(2.0)
        experts.w_out[2].zero_()
    after = [experts.expert_forward(x, e) for e in range(4)]
    for e in (0, 1, 3):
        assert torch.equal(before[e], after[e])
    assert torch.equal(after[2], torch.zeros_like(after[2])) and not torch.equal(before[2], after[2])


@pytest.mark.parametrize("adjust_lr_fn", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("shape", [(4, 24, 40), (3, 40, 24)])  # wide and tall expert matrices
def test_stacked_experts_take_torchs_muon_update_of_each_expert(shape, adjust_lr_fn):
    # the experts batched through one Newton-Schulz must equal torch.optim.Muon stepping each expert's
    # matrix as its own 2-D parameter, momentum and weight decay included, over several steps
    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(shape))
    start = stacked.detach().clone()
    apart = [torch.nn.Parameter(m.detach().clone()) for m in stacked.unbind(0)]
    hyper = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=True, adjust_lr_fn=adjust_lr_fn, ns_steps=5)
    ours, reference = Muon([], [stacked], **hyper), torch.optim.Muon(apart, **hyper)
    for _ in range(3):
        grad = torch.randn(shape)
        stacked.grad = grad.clone()
        for p, g in zip(apart, grad.unbind(0)):
            p.grad = g.clone()
        ours.step()
        reference.step()
    expected = torch.stack([p.detach() for p in apart])
    moved = (expected - start).abs().max().item()
    error = (stacked.detach() - expected).abs().max().item()
    assert error <= 1e-3 * moved, (error, moved)  # bf16 products batched or not: rounding at most
    torch.testing.assert_close(ours.state[stacked]["momentum_buffer"],
                               torch.stack([reference.state[p]["momentum_buffer"] for p in apart]))


@pytest.mark.parametrize("ns_steps", [5, 2])  # 2: muon_ns_steps reaches every matrix, experts included
def test_one_muon_step_matches_the_reference(data_dir, tmp_path, ns_steps):
    lr, wd, momentum = 1e-2, 0.1, 0.95
    cfg = quiet(schedule="constant", lr=lr, weight_decay=wd, grad_clip=0.0, muon_momentum=momentum,
                muon_ns_steps=ns_steps)
    # the gradients of the first step, from an identical trainer whose optimizer only records them
    probe = Trainer(tiny_model(), cfg, tmp_path / "probe", data_dir)
    grads = {}
    probe.optimizer.step = lambda *a, **k: grads.update(
        {n: p.grad.detach().clone() for n, p in probe.model.named_parameters()})
    probe.train_step()

    trainer = Trainer(tiny_model(), cfg, tmp_path / "run", data_dir)
    assert isinstance(trainer.optimizer, MuonWithAdamW)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step()
    after = dict(trainer.model.named_parameters())

    n_muon = 0
    for name, p0 in before.items():
        g = grads[name]
        decayed = p0 * (1 - lr * wd) if p0.dim() >= 2 else p0
        if HIDDEN.fullmatch(name):
            n_muon += 1
            # Moonlight's scale: 0.2 * sqrt(max(rows, cols)) of each expert's own (rows, cols)
            mats = [(p0[e], g[e]) for e in range(p0.shape[0])] if p0.dim() == 3 else [(p0, g)]
            expected = torch.stack([m * (1 - lr * wd) - lr * 0.2 * max(m.shape) ** 0.5
                                    * muon_update(gm, momentum, ns_steps) for m, gm in mats]).reshape(p0.shape)
            # bf16 rounds at slightly different points in torch's fused products: ~1% per element
            step = (after[name].detach() - decayed).abs().max()
            torch.testing.assert_close(after[name].detach(), expected, rtol=0, atol=0.05 * step.item(), msg=name)
            error = (after[name].detach() - expected).norm() / (expected - decayed).norm()
            assert error < 0.02, (name, error)  # torch's Newton-Schulz runs in bf16: ~1% (1.1% seen)
            if p0.dim() == 3:  # the whole stack orthogonalized as one matrix is a different update
                flat = muon_update(g.reshape(-1, g.shape[-1]), momentum, ns_steps).reshape(g.shape)
                wrong = decayed - lr * 0.2 * max(p0.shape[1:]) ** 0.5 * flat
                assert (after[name].detach() - wrong).abs().max() > 0.3 * step
        else:  # AdamW's first step: m / sqrt(v) = g / |g| (bias-corrected)
            expected = decayed - lr * g / (g.abs() + cfg.eps)
            torch.testing.assert_close(after[name].detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
    assert n_muon == 10  # 2 x (qkv, proj), dense fc/proj, shared fc/proj, experts w_in/w_out


def test_resume_with_muon_is_bitwise_exact(data_dir, tmp_path):
    model_cfg, cfg = tiny_model(dropout=0.1), quiet(grad_accum=2, muon_lr=0.02, muon_adjust_lr="original")
    straight = Trainer(model_cfg, cfg, tmp_path / "straight", data_dir)
    straight.fit()
    first = Trainer(model_cfg, cfg, tmp_path / "split", data_dir)
    assert first.fit(stop_at_step=3)["stopped"]
    second = Trainer(model_cfg, cfg, tmp_path / "split", data_dir, resume_from=tmp_path / "split")
    second.fit()
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name
    ma, mb = straight.optimizer.muon.state_dict()["state"], second.optimizer.muon.state_dict()["state"]
    assert len(ma) == 10
    for k in ma:
        assert torch.equal(ma[k]["momentum_buffer"], mb[k]["momentum_buffer"])
    # the Muon groups follow the schedule at their own peak lr (muon_lr / lr times AdamW's)
    muon_lr, adamw_lr = straight.optimizer.muon.param_groups[0]["lr"], straight.optimizer.adamw.param_groups[0]["lr"]
    assert muon_lr == pytest.approx(adamw_lr * 0.02 / cfg.lr)


def test_resume_takes_this_runs_muon_settings_not_the_saved_ones(data_dir, tmp_path):
    Trainer(tiny_model(), quiet(max_steps=2), tmp_path / "run", data_dir).fit()
    resumed = Trainer(tiny_model(), quiet(max_steps=3, muon_ns_steps=2, muon_lr=0.02), tmp_path / "run", data_dir,
                      resume_from=tmp_path / "run")
    assert resumed.state.step == 2
    assert {(g["ns_steps"], g["lr_ratio"]) for g in resumed.optimizer.muon.param_groups} == {(2, 0.02 / resumed.cfg.lr)}


def test_gradient_clipping_applies_to_muon(data_dir, tmp_path):
    trainer = Trainer(tiny_model(), quiet(grad_clip=1e-3), tmp_path / "run", data_dir)
    seen = {}
    real_step = trainer.optimizer.step

    def step(*a, **k):
        seen["norm"] = torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters()]).item()
        return real_step(*a, **k)

    trainer.optimizer.step = step
    metrics = trainer.train_step().read()
    assert metrics["grad_norm"] > 1e-3
    assert seen["norm"] == pytest.approx(1e-3, rel=1e-3)  # the optimizer saw the clipped gradients


def test_muon_experts_false_leaves_the_routed_experts_on_adamw():
    model = GPT(tiny_model())
    optimizer = build_optimizer(model, quiet(muon_experts=False))
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    on_adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    experts = {n for n in names.values() if ".experts." in n}
    assert experts == {"blocks.1.ffn.experts.w_in", "blocks.1.ffn.experts.w_out"}
    assert experts <= on_adamw and not experts & on_muon
    assert on_muon == {n for n in names.values() if HIDDEN.fullmatch(n)} - experts  # the rest stays on Muon
    assert on_muon | on_adamw == set(names.values())


def test_muon_needs_hidden_matrices():
    model = GPT(tiny_model())
    for p in hidden_matrices(model):
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="no.*hidden|hidden.*none.*optimizer=adamw"):
        build_optimizer(model, quiet())


def test_muon_refuses_fsdp_fp16_and_bad_ns_steps_clearly():
    with pytest.raises(ConfigError, match="FSDP.*--strategy ddp"):
        quiet(strategy="fsdp")
    with pytest.raises(ConfigError, match="precision=bf16"):
        quiet(precision="fp16")
    for bad in (0, 100):
        with pytest.raises(ConfigError, match=r"muon_ns_steps must be in 1\.\.99"):
            quiet(muon_ns_steps=bad)


def test_resuming_with_the_other_optimizer_is_refused(data_dir, tmp_path):
    Trainer(tiny_model(), quiet(max_steps=1), tmp_path / "run", data_dir).fit()
    with pytest.raises(CheckpointError, match="optimizer muon.*--set optimizer=muon"):
        Trainer(tiny_model(), quiet(max_steps=2, optimizer="adamw"), tmp_path / "run", data_dir,
                resume_from=tmp_path / "run")
