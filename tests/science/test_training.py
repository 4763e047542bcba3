"""A tiny training run learns, and writes a checkpoint the service serves."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from service.engine.checkpoints import STAGE_CHANNELS, load_checkpoint
from service.engine.loading import load_engine
from service.engine.networks import INITIAL_CHANNELS, build_unet
from service.science.dataset import find_cases, load_prepared
from service.science.training import train
from service.science.training_config import CONFIGS
from service.science.training_loop import Member, fit
from service.science.training_samples import StageTrainer
from service.settings import Settings

CPU = torch.device("cpu")


TWO_STAGE = replace(CONFIGS["tiny"], member_steps=2, val_every=2)


@pytest.fixture(scope="module")
def two_stage_run(phantom_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run folder, checkpoint) of one tiny 2S-ICR run (seed 5): tests that need a trained checkpoint share it."""
    run = tmp_path_factory.mktemp("two-stage") / "run"
    weights = train("2s-icr", phantom_data, run, TWO_STAGE, device=CPU, seed=5)
    assert weights is not None
    return run, weights


@pytest.mark.parametrize("autocast", ["off", "bfloat16"])
def test_fitting_lowers_the_loss(autocast: str, phantom_data: Path, tmp_path: Path) -> None:
    config = replace(CONFIGS["tiny"], lr=3e-3, val_every=5, autocast=autocast)
    case = load_prepared(find_cases(phantom_data)[0], config.grid_shape, config.spacing_mm)
    torch.manual_seed(0)
    net = build_unet(INITIAL_CHANNELS, config.architecture)
    trainer = StageTrainer("unet", "initial", config, CPU, seed=0)
    batch = torch.from_numpy(case.images)[None]
    target = torch.from_numpy(case.truth[None, None].astype(np.float32))

    def loss() -> float:
        net.eval()
        with torch.no_grad():
            value = float(trainer.loss(net(batch), target))
        net.train()
        return value

    before = loss()
    fit(trainer, Member(net), 0, [case], [case], 15, tmp_path / "state.pt", "test")
    assert loss() < before - 0.05


@pytest.mark.parametrize("budget", ["steps", "samples"])
def test_the_budget_counts_optimizer_steps_or_whole_samples(budget: str, phantom_data: Path, tmp_path: Path) -> None:
    # 2S-ICR's refinement makes one optimizer step per interaction (1-3 per sample here)
    config = replace(CONFIGS["tiny"], budget=budget, max_train_clicks=3, val_every=3)
    case = load_prepared(find_cases(phantom_data)[0], config.grid_shape, config.spacing_mm)
    torch.manual_seed(0)
    trainer = StageTrainer("2s-icr", "refinement", config, CPU, seed=0)
    trainer.use_initial([build_unet(INITIAL_CHANNELS, config.architecture)], [{"train": [case.id], "val": []}])
    interactions: list[int] = []
    sample_steps = trainer.steps

    def counted(*args):
        closures = sample_steps(*args)
        interactions.append(len(closures))
        return closures

    trainer.steps = counted
    net = build_unet(STAGE_CHANNELS["refinement"], config.architecture)
    fit(trainer, Member(net), 0, [case], [case], 6, tmp_path / "state.pt", "test")
    saved = torch.load(tmp_path / "state.pt", weights_only=False)
    optimizer_steps = int(saved["optimiser"]["state"][0]["step"])
    assert saved["step"] == saved["schedule"]["last_epoch"] == 6
    assert [entry["step"] for entry in saved["history"]] == [3, 6]
    if budget == "samples":
        assert len(interactions) == 6 and optimizer_steps == sum(interactions) > 6
    else:
        assert optimizer_steps == 6 and len(interactions) < 6


@pytest.mark.parametrize(("method", "stage"), [("2s-icr", "refinement"), ("deepgrow", "interactive")])
def test_mixed_precision_trains_the_click_taking_stages(method: str, stage: str, phantom_data: Path, tmp_path: Path) -> None:
    config = replace(CONFIGS["tiny"], autocast="bfloat16", max_train_clicks=3, val_every=2)
    case = load_prepared(find_cases(phantom_data)[0], config.grid_shape, config.spacing_mm)
    torch.manual_seed(0)
    trainer = StageTrainer(method, stage, config, CPU, seed=0)
    trainer.use_initial([build_unet(INITIAL_CHANNELS, config.architecture)], [{"train": [case.id], "val": []}])
    net = build_unet(STAGE_CHANNELS[stage], config.architecture)
    before = {name: value.clone() for name, value in net.state_dict().items()}
    member = fit(trainer, Member(net), 0, [case], [case], 2, tmp_path / "state.pt", "test")
    after = member.net.state_dict()
    assert all(value.dtype == torch.float32 for value in after.values())  # the weights stay float32
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert 0.0 <= member.best_metric <= 1.0


@pytest.mark.parametrize(("memory", "expected"), [("fold", [[0], [1]]), ("held-out", [[1], [0]]),
                                                  ("ensemble", [[0, 1], [0, 1]])])
def test_refinement_memory_comes_from_the_fold_member_the_one_that_never_saw_the_case_or_all(
    memory: str, expected: list[list[int]]
) -> None:
    config = replace(CONFIGS["tiny"], refinement_memory=memory)
    trainer = StageTrainer("2s-icr", "refinement", config, CPU, seed=0)
    members = [build_unet(INITIAL_CHANNELS, config.architecture) for _ in range(2)]
    trainer.use_initial(members, [{"train": ["a"], "val": ["b"]}, {"train": ["b"], "val": ["a"]}])
    # fold 0 trains on case a, fold 1 on case b
    assert [trainer.memory_nets("a", 0), trainer.memory_nets("b", 1)] == [[members[i] for i in e] for e in expected]


def test_training_writes_a_checkpoint_the_service_loads(phantom_data: Path, two_stage_run: tuple[Path, Path]) -> None:
    run, weights = two_stage_run
    summary = json.loads((run / "training.json").read_text())
    assert summary["method"] == "2s-icr" and len(summary["folds"]) == 2
    assert set(summary["stages"]) == {"initial", "refinement"}
    assert all("val_dsc" in step for member in summary["stages"]["refinement"] for step in member["history"])
    checkpoint = load_checkpoint(weights)
    assert len(checkpoint.stages["initial"]) == len(checkpoint.stages["refinement"]) == 2
    engine = load_engine(Settings(weights=weights, device="cpu"))
    case = load_prepared(find_cases(phantom_data)[0], checkpoint.grid_shape, checkpoint.spacing_mm)
    probability = engine.initial_probability(case.images)
    assert probability.shape == checkpoint.grid_shape
    # a second run of the same command finds every member done: it trains nothing (no state
    # is rewritten, no validation added) and writes the same checkpoint
    states = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in (run / "state").iterdir()}
    assert len(states) == 2 * 2  # initial and refinement, one per fold (tiny has no shared warm start)
    again = train("2s-icr", phantom_data, run, TWO_STAGE, device=CPU, seed=5)
    assert again == weights
    assert {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in (run / "state").iterdir()} == states
    assert json.loads((run / "training.json").read_text())["stages"] == summary["stages"]
    assert load_checkpoint(again).digest == checkpoint.digest


class StopsAtSecondValidation(StageTrainer):
    """A trainer whose run is cut off at its second validation, after the first one was saved."""

    validations = 0

    def validate(self, net, fold, cases):  # type: ignore[no-untyped-def]
        self.validations += 1
        if self.validations == 2:
            raise KeyboardInterrupt
        return super().validate(net, fold, cases)


def test_an_interrupted_fit_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(
    phantom_data: Path, tmp_path: Path
) -> None:
    config = replace(CONFIGS["tiny"], val_every=2, patience=10)
    case = load_prepared(find_cases(phantom_data)[0], config.grid_shape, config.spacing_mm)

    def start() -> Member:
        torch.manual_seed(0)
        return Member(build_unet(INITIAL_CHANNELS, config.architecture))

    whole = fit(StageTrainer("unet", "initial", config, CPU, seed=0), start(), 0, [case], [case], 6,
                tmp_path / "whole.pt", "whole")
    with pytest.raises(KeyboardInterrupt):
        fit(StopsAtSecondValidation("unet", "initial", config, CPU, seed=0), start(), 0, [case], [case], 6,
            tmp_path / "cut.pt", "cut")
    assert torch.load(tmp_path / "cut.pt", weights_only=False)["step"] == 2  # saved at the first validation
    resumed = fit(StageTrainer("unet", "initial", config, CPU, seed=99), start(), 0, [case], [case], 6,
                  tmp_path / "cut.pt", "resumed")
    assert [entry["step"] for entry in resumed.history] == [2, 4, 6]  # the saved validation kept, 4 and 6 added
    saved = torch.load(tmp_path / "cut.pt", weights_only=False)
    assert saved["step"] == 6 and int(saved["optimiser"]["state"][0]["step"]) == 6
    assert resumed.history == whole.history and resumed.best_metric == whole.best_metric
    for name, value in whole.net.state_dict().items():  # same samples, same schedule: the same weights
        torch.testing.assert_close(resumed.net.state_dict()[name], value)


def test_baselines_train_their_single_interactive_stage(phantom_data: Path, tmp_path: Path) -> None:
    config = replace(CONFIGS["tiny"], member_steps=2, val_every=2, folds=2)
    checkpoint = load_checkpoint(train("deepedit-25", phantom_data, tmp_path / "de", config, device=CPU), method=None)
    assert checkpoint.method == "deepedit-25" and set(checkpoint.stages) == {"interactive"}


@pytest.mark.slow  # three whole training runs
def test_click_guided_nets_start_from_an_initial_net_and_ship_without_it(phantom_data: Path, tmp_path: Path) -> None:
    # first layer wider than every input, so the initial and the widened nets have the same layers
    architecture = replace(CONFIGS["tiny"].architecture, channels=(6, 8, 16))
    config = replace(CONFIGS["tiny"], architecture=architecture, member_steps=2, val_every=2, folds=2,
                     interactive_from_initial=True)
    checkpoint = load_checkpoint(train("deepgrow", phantom_data, tmp_path / "dg", config, device=CPU), method=None)
    assert set(checkpoint.stages) == {"interactive"}
    assert set(json.loads((tmp_path / "dg" / "training.json").read_text())["stages"]) == {"initial", "interactive"}
    # a trained initial ensemble can be reused instead of training one
    unet = train("unet", phantom_data, tmp_path / "unet", config, device=CPU)
    train("deepedit-50", phantom_data, tmp_path / "de", config, device=CPU, initial_from=unet)
    reused = json.loads((tmp_path / "de" / "training.json").read_text())["stages"]["initial"]
    assert reused[0]["reused_from"] == str(unet)
    with pytest.raises(ValueError, match="--initial-from"):
        train("unet", phantom_data, tmp_path / "again", config, device=CPU, initial_from=unet)


def test_refinement_warm_start_reproduces_the_initial_net() -> None:
    from service.engine.networks import REFINEMENT_CHANNELS
    from service.science.training_loop import widen_inputs_from

    architecture = CONFIGS["tiny"].architecture
    torch.manual_seed(2)
    initial, refinement = build_unet(INITIAL_CHANNELS, architecture).eval(), build_unet(REFINEMENT_CHANNELS, architecture).eval()
    widen_inputs_from(refinement, initial)
    images, extra = torch.randn(1, 2, 16, 16, 16), torch.randn(1, 3, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(refinement(torch.cat([images, extra], 1)), initial(images), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("refinement_from_initial", [True, False])
def test_which_click_taking_nets_start_as_the_initial_net(refinement_from_initial: bool) -> None:
    from service.science.training_loop import starting_net

    # first layer wider than every input, so the initial and the widened nets have the same layers
    architecture = replace(CONFIGS["tiny"].architecture, channels=(6, 8, 16))
    config = replace(CONFIGS["tiny"], architecture=architecture, interactive_from_initial=True,
                     refinement_from_initial=refinement_from_initial)
    torch.manual_seed(2)
    initial = build_unet(INITIAL_CHANNELS, config.architecture).eval()
    images = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        expected = initial(images)
        for stage, extra in (("interactive", 2), ("refinement", 3)):
            net = starting_net(stage, config, [initial]).eval()
            output = net(torch.cat([images, torch.rand(1, extra, 16, 16, 16)], 1))
            copied = stage == "interactive" or refinement_from_initial
            assert torch.allclose(output, expected, atol=1e-5) == copied
            if not copied:  # from scratch, at the output prior
                assert torch.sigmoid(output).median().item() < 0.05


@pytest.mark.parametrize("config", ["tiny", "reduced", "paper-cpu"])
def test_a_net_from_scratch_starts_at_the_output_prior(config: str) -> None:
    from service.science.training_loop import start_from_prior

    torch.manual_seed(4)
    net = build_unet(INITIAL_CHANNELS, CONFIGS[config].architecture).eval()
    images = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        before = torch.sigmoid(net(images)).median().item()
        start_from_prior(net, 0.01)
        after = torch.sigmoid(net(images)).median().item()
    assert 0.3 < before < 0.7  # MONAI's initialisation: about 0.5 everywhere
    assert 0.002 < after < 0.05  # near the prior (the residual path adds its own small offset)
    with pytest.raises(ValueError, match="output prior"):
        start_from_prior(net, 1.0)


def test_train_options_set_the_click_loss_and_its_radius() -> None:
    import argparse

    from service.engine.clicks import click_balls
    from service.science.training import config_from_arguments, register
    from service.store.contract import Click

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    required = ["train", "--method", "2s-icr", "--data", "d", "--out", "o"]
    config = config_from_arguments(parser.parse_args([*required, "--click-loss", "10", "--click-loss-radius", "0"]))
    assert (config.click_loss_weight, config.click_loss_radius_voxels) == (10.0, 0.0)
    assert config_from_arguments(parser.parse_args(required)) == CONFIGS["reduced"]  # no option, no override
    assert click_balls([Click("background", (2, 3, 4))], (6, 6, 6), 0.0).sum() == 1  # radius 0: the clicked voxel
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit):
            parser.parse_args([*required, "--click-loss-radius", bad])


def test_train_options_set_the_click_sigma_and_reach_and_refuse_bad_values() -> None:
    import argparse

    from service.science.training import config_from_arguments, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    required = ["train", "--method", "2s-icr", "--data", "d", "--out", "o"]
    assert config_from_arguments(parser.parse_args([*required, "--click-sigma", "1.5"])).click_sigma_voxels == 1.5
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit):
            parser.parse_args([*required, "--click-sigma", bad])
    assert config_from_arguments(parser.parse_args(required)).click_reach_sigma_voxels == {}
    both = parser.parse_args([*required, "--click-reach", "foreground=3", "--click-reach", "background=2.5"])
    assert config_from_arguments(both).click_reach_sigma_voxels == {"foreground": 3.0, "background": 2.5}
    for bad in ("tumour=3", "foreground=0", "foreground", "background=-2", "foreground=nan"):
        with pytest.raises(SystemExit):
            parser.parse_args([*required, "--click-reach", bad])


def test_the_click_loss_adds_the_bce_at_the_click_balls(phantom_data: Path) -> None:
    config = replace(CONFIGS["tiny"], max_train_clicks=3)
    case = load_prepared(find_cases(phantom_data)[0], config.grid_shape, config.spacing_mm)
    torch.manual_seed(0)
    initial = build_unet(INITIAL_CHANNELS, config.architecture)
    net = build_unet(STAGE_CHANNELS["refinement"], config.architecture)
    losses = {}
    for weight in (0.0, 1.0):
        trainer = StageTrainer("2s-icr", "refinement", replace(config, click_loss_weight=weight), CPU, seed=3)
        trainer.use_initial([initial], [{"train": [case.id], "val": []}])
        closure = trainer.steps(net, 0, [case])[0]  # the same sample and click for both weights
        with torch.no_grad():
            losses[weight] = float(closure())
    assert losses[1.0] > losses[0.0] + 0.01  # an untrained net gets the clicked voxels wrong


@pytest.mark.slow  # three more training runs, member by member
def test_members_can_be_trained_by_several_processes_into_the_same_checkpoint(
    phantom_data: Path, two_stage_run: tuple[Path, Path], tmp_path: Path
) -> None:
    config = TWO_STAGE
    whole = load_checkpoint(two_stage_run[1])
    run = tmp_path / "split"
    # member 0 first: the initial stage waits for member 1, so nothing is written
    assert train("2s-icr", phantom_data, run, config, device=CPU, seed=5, only_members=[0]) is None
    # member 1: the initial stage is complete, refinement member 0 is still to train
    assert train("2s-icr", phantom_data, run, config, device=CPU, seed=5, only_members=[1]) is None
    weights = train("2s-icr", phantom_data, run, config, device=CPU, seed=5, only_members=[0])
    assert weights is not None
    split = load_checkpoint(weights)
    for stage in ("initial", "refinement"):
        for one, other in zip(whole.stages[stage], split.stages[stage]):
            for name, value in one.state_dict().items():
                torch.testing.assert_close(other.state_dict()[name], value)


def test_refinement_training_can_continue_from_a_checkpoint(
    phantom_data: Path, two_stage_run: tuple[Path, Path], tmp_path: Path
) -> None:
    config = TWO_STAGE
    first = two_stage_run[1]
    train("2s-icr", phantom_data, tmp_path / "more", config, device=CPU, seed=5, initial_from=first,
          refinement_from_checkpoint=first)
    reports = json.loads((tmp_path / "more" / "training.json").read_text())["stages"]
    assert reports["refinement"][0] == {"continued_from": str(first)}
    assert reports["initial"][0]["reused_from"] == str(first)
    with pytest.raises(ValueError, match="2s-icr"):
        train("deepgrow", phantom_data, tmp_path / "dg", config, device=CPU, refinement_from_checkpoint=first)


class _Recording(torch.nn.Module):
    """A net that records each pass's memory input and output probability."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.memories, self.outputs = net, [], []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        logits = self.net(inputs)
        self.memories.append(inputs[0, INITIAL_CHANNELS].detach().clone())
        self.outputs.append(torch.sigmoid(logits.detach().float())[0, 0])
        return logits


def test_with_peers_each_interaction_remembers_the_mean_of_the_member_and_the_other_folds_peers(
    phantom_data: Path,
) -> None:
    config = replace(CONFIGS["tiny"], max_train_clicks=3, p_drop=0.0, zero_click_passes=1)  # >= 2 interactions
    case = load_prepared(find_cases(phantom_data)[0], config.grid_shape, config.spacing_mm)
    torch.manual_seed(0)
    peers = [build_unet(STAGE_CHANNELS["refinement"], config.architecture) for _ in range(3)]
    for peer, prior in zip(peers, (0.5, 1e-6, 0.9)):  # constant outputs: 0.5 (its own fold's), ~0, 0.9
        for parameter in peer.parameters():
            torch.nn.init.zeros_(parameter)
        [m for m in peer.modules() if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d)][-1].bias.data.fill_(
            float(np.log(prior / (1 - prior))))
    trainer = StageTrainer("2s-icr", "refinement", config, CPU, seed=3)
    trainer.use_initial([build_unet(INITIAL_CHANNELS, config.architecture)] * 3,
                        [{"train": [case.id], "val": []}] * 3)
    trainer.use_peers(peers)
    assert trainer.peers(0) == [peers[1], peers[2]]
    net = _Recording(build_unet(STAGE_CHANNELS["refinement"], config.architecture))
    for closure in trainer.steps(net, 0, [case])[:2]:
        closure()
    expected = (net.outputs[0] + 1e-6 + 0.9) / 3  # its own output and fold 1's and 2's peers', not fold 0's
    torch.testing.assert_close(net.memories[1], expected, atol=1e-5, rtol=0)
    # validation runs the same ensemble
    assert trainer.segmenter(net.net, 0).checkpoint.stages["refinement"] == [net.net, peers[1], peers[2]]
