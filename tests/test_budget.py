"""Time budgets: `--max-time` fixes the step count from the first steps' measured time, saves that
decision, resumes bit for bit, reports what the budget bought, and refuses bad input clearly.

Step times come from a fake clock (each step takes exactly `seconds_per_step`), so the decision is
known in advance: the tests check the arithmetic, not this machine's speed."""

import json
import types

import pytest
import torch

import nanomoe.training.trainer as trainer_module
from nanomoe.cli import main
from nanomoe.data import prepare_data
from nanomoe.errors import ConfigError
from nanomoe.presets import get_preset
from nanomoe.training import checkpoint as ckpt
from nanomoe.training.budget import ENDLESS, MEASURE_STEPS, WARMUP_STEPS, TimeBudget, parse_duration
from nanomoe.training.config import TrainConfig
from nanomoe.training.schedule import lr_and_beta1
from nanomoe.training.trainer import Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "stories"
    return prepare_data("builtin:0.4", out, vocab_size=512, progress=False)


def fake_clock(monkeypatch, seconds_per_step: float) -> None:
    """The trainer times a step with two perf_counter() calls; each call advances the clock one step."""
    now = [0.0]

    def perf_counter():
        now[0] += seconds_per_step
        return now[0]

    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=perf_counter))


def quiet(**changes) -> TrainConfig:
    base = dict(batch_size=4, eval_every=1000, eval_batches=2, save_every=0, log_every=1000, samples=0,
                tensorboard=False, plots=False, progress=False, precision="fp32", lr=1e-3, seed=3)
    return TrainConfig(**{**base, **changes})


def model():
    return get_preset("debug", vocab_size=512, block_size=32, dropout=0.1)


@pytest.mark.parametrize("text, seconds", [("10m", 600), ("90s", 90), ("1.5h", 5400), ("1h30m", 5400),
                                           (" 2 min ", 120), (".5m", 30)])
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10", "ten minutes", "10x", "-5m", "0m", "", "5m garbage"])
def test_malformed_durations_are_clear_errors(text):
    with pytest.raises(ConfigError, match="duration|no time"):
        parse_duration(text)


def test_the_decision_is_the_measured_speed_times_the_remaining_budget():
    budget = TimeBudget(60.0)
    times = [5.0, 3.0] + [1.0, 1.0, 2.0, 1.0, 1.0]  # warm-up steps are slow and not counted
    elapsed = 0.0
    for step, t in enumerate(times, 1):
        elapsed += t
        total = budget.observe(step, t, elapsed)
        assert total == (ENDLESS if step < WARMUP_STEPS + MEASURE_STEPS else total)
    # 14 s spent, 1.2 s/step measured: floor(46 / 1.2) = 38 more steps
    assert budget.decision.seconds_per_step == pytest.approx(1.2)
    assert total == 7 + 38


def test_a_budget_that_runs_out_while_measuring_stops_there():
    budget = TimeBudget(2.5)
    assert budget.observe(1, 1.0, 1.0) == ENDLESS
    assert budget.observe(2, 1.0, 2.0) == ENDLESS
    assert budget.observe(3, 1.0, 3.0) == 3  # over budget: no more steps


def test_budget_run_ends_on_the_budget_and_resume_is_bitwise_exact(data_dir, tmp_path, monkeypatch):
    # 0.1 minute at 0.5 s/step: 7 steps measured (3.5 s), floor(2.5 / 0.5) = 5 more -> 12 steps
    cfg = quiet(max_minutes=0.1, grad_accum=2, max_steps=500)  # the budget wins over max_steps
    fake_clock(monkeypatch, 0.5)
    straight = Trainer(model(), cfg, tmp_path / "straight", data_dir)
    result = straight.fit()
    assert result["step"] == straight.total_steps == 12
    assert result["budget"]["total_steps"] == 12 and result["budget"]["decided_at_step"] == 7
    assert result["elapsed_seconds"] == pytest.approx(6.0)
    assert "bought 12 steps" in result["budget_summary"] and f"{result['tokens_seen'] / 1e6:.2f}M tokens" in \
        result["budget_summary"]
    saved = ckpt.read_json(ckpt.resolve_checkpoint(tmp_path / "straight", prefer="latest") / "trainer_state.json")
    assert saved["budget"]["total_steps"] == 12 and saved["total_steps"] == 12

    fake_clock(monkeypatch, 0.5)
    first = Trainer(model(), cfg, tmp_path / "split", data_dir)
    assert first.fit(stop_at_step=9)["stopped"]
    fake_clock(monkeypatch, 5.0)  # a slower machine on resume must not change the saved decision
    second = Trainer(model(), cfg, tmp_path / "split", data_dir, resume_from=tmp_path / "split")
    assert second.total_steps == 12
    assert second.fit()["step"] == 12
    a, b = straight.model.state_dict(), second.model.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_schedule_before_the_decision_is_an_endless_runs():
    cfg = quiet(max_minutes=1.0)
    # the steps that are timed train at the bottom of the warmup ramp, the same on every resume
    assert lr_and_beta1(cfg, 3, ENDLESS)[0] < 1e-12


def test_the_schedule_warmup_included_spans_the_steps_the_budget_bought(data_dir, tmp_path, monkeypatch):
    # 0.4 minute at 0.5 s/step: 7 steps measured (3.5 s), floor(20.5 / 0.5) = 41 bought -> 48 steps. The lr
    # of steps 7..47 is a 41-step run's schedule from its first warmup step, not step 7 of a 48-step run
    # (its warmup of 2 steps long over: the lr would jump from ~0 to the peak at the decision)
    fake_clock(monkeypatch, 0.5)
    cfg = quiet(max_minutes=0.4, schedule="wsd")
    trainer = Trainer(model(), cfg, tmp_path / "run", data_dir)
    lrs, set_lr = [], trainer._set_lr
    monkeypatch.setattr(trainer, "_set_lr", lambda: lrs.append(set_lr()) or lrs[-1])
    assert trainer.fit()["step"] == 48
    assert all(lr < 1e-12 for lr in lrs[:7])
    assert lrs[7:] == [lr_and_beta1(cfg, step, 41)[0] for step in range(41)]
    assert lrs[7] == pytest.approx(cfg.lr / 2) and lrs[-1] == pytest.approx(cfg.lr * cfg.min_lr_ratio)


def test_resume_with_a_new_budget_extends_the_run_at_the_saved_speed(data_dir, tmp_path, monkeypatch):
    fake_clock(monkeypatch, 0.5)
    cfg = quiet(max_minutes=0.1)
    Trainer(model(), cfg, tmp_path / "run", data_dir).fit()
    longer = Trainer(model(), cfg.replace(max_minutes=0.2), tmp_path / "run", data_dir, resume_from=tmp_path / "run")
    assert longer.total_steps == 12 + 12  # 6 more seconds at 0.5 s/step
    assert longer.budget.schedule_position(12) == (12 - 7, 24 - 7)  # the schedule still starts at the decision


def test_a_budget_added_on_resume_decides_from_the_runs_average_speed(data_dir, tmp_path, monkeypatch):
    fake_clock(monkeypatch, 0.5)
    Trainer(model(), quiet(max_steps=4), tmp_path / "run", data_dir).fit()  # 2 s of training
    resumed = Trainer(model(), quiet(max_minutes=0.1), tmp_path / "run", data_dir, resume_from=tmp_path / "run")
    assert resumed.total_steps == 4 + 8  # 4 s left at 0.5 s/step, decided at once, no endless schedule


def test_a_budget_shorter_than_one_step_is_a_clear_error(data_dir, tmp_path, monkeypatch):
    fake_clock(monkeypatch, 2.0)
    trainer = Trainer(model(), quiet(max_minutes=0.01), tmp_path / "run", data_dir)  # 0.6 s
    with pytest.raises(ConfigError, match="shorter than one training step.*at least 20 s"):
        trainer.fit()


def test_cli_max_time_trains_for_the_budget_and_reports_it(data_dir, tmp_path, monkeypatch, capsys):
    fake_clock(monkeypatch, 0.5)
    run = tmp_path / "run"
    args = ["train", "--preset", "debug", "--recipe", "debug", "--data", str(data_dir), "--out", str(run),
            "--no-progress", "--max-time", "6s", "--set", "block_size=32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "time budget 6.0s bought 12 steps" in out
    first = next(line for line in out.splitlines() if line.startswith("nanomoe train:"))
    assert first.endswith(f"a 6.0s budget of training steps -> {run}")  # not the schedule's endless length
    assert json.loads((run / "latest.json").read_text())["step"] == 12
    assert json.loads((run / "run.json").read_text())["train"]["max_minutes"] == 0.1
    # --max-steps on resume replaces the budget
    assert main(["train", "--resume", str(run), "--max-steps", "14", "--no-progress"]) == 0
    assert json.loads((run / "latest.json").read_text())["step"] == 14


@pytest.mark.parametrize("flags, message", [
    (["--max-time", "10"], "give a unit|number with a unit"),
    (["--max-time", "5m", "--max-steps", "3"], "either --max-time"),
    (["--set", "max_minutes=-1"], "max_minutes must be >= 0"),
])
def test_cli_bad_budgets_are_clear_errors(data_dir, tmp_path, capsys, flags, message):
    args = ["train", "--preset", "debug", "--data", str(data_dir), "--out", str(tmp_path / "run"), *flags]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert pytest.importorskip("re").search(message, err), err
