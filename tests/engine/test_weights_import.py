"""Bring your own weights: member checkpoints as MONAI and Lightning save them import, serve,
check and export; every mismatch is refused with its reason, and nothing is written."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import monai
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from monai.bundle import ConfigParser, verify_net_in_out
from monai.bundle import load as load_bundle

from service.api.app import create_app
from service.cli import main
from service.engine.ensemble import Engine
from service.engine.loading import load_engine
from service.engine.networks import (
    INITIAL_CHANNELS,
    REFINEMENT_CHANNELS,
    Architecture,
    build_unet,
)
from service.settings import Settings
from service.store.contract import Click

TINY = Architecture(channels=(4, 8, 16), strides=(1, 2), num_res_units=1)
TINY_ARGS = ["--channels", "4,8,16", "--strides", "1,2", "--res-units", "1", "--grid", "32,32,32"]
GRID = (32, 32, 32)
State = dict[str, torch.Tensor]

# How MONAI scripts, PyTorch Lightning and DataParallel save a UNet's weights.
WRAPPERS: dict[str, Callable[[State], object]] = {
    "bare": lambda state: state,
    "lightning": lambda state: {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 7,
                                "global_step": 700},
    "model": lambda state: {"model": state, "epoch": 7},
    "net": lambda state: {"net": state},
    "network": lambda state: {"network": state, "best_dsc": 0.8},
    "data-parallel": lambda state: {f"module.{k}": v for k, v in state.items()},
    "lightning-data-parallel": lambda state: {"state_dict": {f"module.model.{k}": v for k, v in state.items()}},
}


def member_state(in_channels: int, seed: int, dtype: torch.dtype = torch.float32) -> State:
    torch.manual_seed(seed)
    return {k: v.to(dtype) for k, v in build_unet(in_channels, TINY).state_dict().items()}


def settings_for(weights: Path) -> Settings:
    fields: dict[str, Any] = {"weights": weights, "device": "cpu", "autocast": "off", "torch_threads": 1,
                              "redis_url": None, "api_keys": None}
    return Settings(**fields)


def weights(*args: str | Path) -> int:
    return main(["weights", *map(str, args)])


def import_folder(source: Path, out: Path, *, refinement: bool = True) -> int:
    patterns = ["--initial", "initial-*.pt"] + (["--refinement", "refinement-*.pt"] if refinement else [])
    return weights("import", source, "--out", out, *patterns, *TINY_ARGS)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """Two initial and two refinement members, Lightning-saved."""
    folder = tmp_path / "trained"
    folder.mkdir()
    for index in range(2):
        torch.save(WRAPPERS["lightning"](member_state(INITIAL_CHANNELS, index)), folder / f"initial-{index}.pt")
        torch.save(WRAPPERS["lightning"](member_state(REFINEMENT_CHANNELS, 10 + index)),
                   folder / f"refinement-{index}.pt")
    return folder


@pytest.fixture
def imported(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "served"
    assert import_folder(source, out) == 0
    return out


def _reference_probability(states: list[State], in_channels: int, inputs: np.ndarray) -> np.ndarray:
    total = np.zeros(inputs.shape[1:], np.float32)
    for state in states:
        net = build_unet(in_channels, TINY).eval()
        net.load_state_dict({k: v.float() for k, v in state.items()})
        with torch.no_grad():
            total += torch.sigmoid(net(torch.from_numpy(inputs)[None]))[0, 0].numpy()
    return total / len(states)


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_each_wrapper_and_prefix_imports_and_serves(wrapper: str, tmp_path: Path) -> None:
    dtype = torch.float16 if wrapper == "data-parallel" else torch.float32
    states = {"initial": member_state(INITIAL_CHANNELS, 1, dtype), "refinement": member_state(REFINEMENT_CHANNELS, 2)}
    source = tmp_path / "trained"
    source.mkdir()
    for stage, state in states.items():
        torch.save(WRAPPERS[wrapper](state), source / f"{stage}-0.pth")
    out = tmp_path / "served"
    assert weights("import", source, "--out", out, "--initial", "initial-*.pth", "--refinement", "refinement-*.pth",
                   *TINY_ARGS) == 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "2s-icr" and manifest["grid"] == {"shape": list(GRID), "spacing_mm": 1.0}
    for stage, state in states.items():
        entry = manifest["stages"][stage]["members"][0]
        assert entry["source"] == str((source / f"{stage}-0.pth").resolve())
        written = torch.load(out / entry["file"], weights_only=True)
        assert list(written) == list(state)  # the UNet's own keys, wrappers and prefixes gone
        assert all(written[k].dtype == v.dtype and torch.equal(written[k], v) for k, v in state.items())

    engine = load_engine(settings_for(out))
    assert engine.stages == ("initial", "refinement")
    images = np.random.default_rng(0).normal(size=(2, *GRID)).astype(np.float32)
    np.testing.assert_allclose(engine.initial_probability(images),
                               _reference_probability([states["initial"]], INITIAL_CHANNELS, images), atol=1e-5)
    previous = np.full(GRID, 0.5, np.float32)
    refined = engine.refine(images, previous, [Click("foreground", (16, 16, 16))])
    assert refined.shape == GRID and np.isfinite(refined).all()


def _truncated(path: Path) -> None:
    torch.save(member_state(INITIAL_CHANNELS, 0), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _without_key(path: Path) -> None:
    state = member_state(INITIAL_CHANNELS, 0)
    del state["model.1.submodule.0.residual.weight"]
    torch.save(state, path)


def _extra_key(path: Path) -> None:
    torch.save({**member_state(INITIAL_CHANNELS, 0), "model.3.conv.weight": torch.zeros(1, 1, 1, 1, 1)}, path)


def _text(path: Path) -> None:
    path.write_text("weights, honest\n")


def _nan(path: Path) -> None:
    state = member_state(INITIAL_CHANNELS, 0)
    state["model.0.conv.unit0.conv.bias"][0] = float("nan")
    torch.save(state, path)


# What is saved as the initial member, and words the refusal must hold (besides the file name).
REFUSALS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "wrong channel count": (lambda p: torch.save(member_state(3, 0), p),
                            ["model.0.conv.unit0.conv.weight", "takes 3 input channels", "(4, 2, 3, 3, 3)"]),
    "wrong stage": (lambda p: torch.save(member_state(REFINEMENT_CHANNELS, 0), p),
                    ["a member of the refinement stage", "initial stage needs 2", "(4, 5, 3, 3, 3)"]),
    "missing key": (_without_key, ["missing key model.1.submodule.0.residual.weight (8, 4, 3, 3, 3)"]),
    "extra key": (_extra_key, ["unexpected key model.3.conv.weight (1, 1, 1, 1, 1)"]),
    "corrupt file": (_truncated, ["not a readable PyTorch checkpoint"]),
    "not a checkpoint": (_text, ["not a readable PyTorch checkpoint"]),
    "no state_dict": (lambda p: torch.save({"epoch": 3, "optimizer": {"lr": 1e-4}}, p),
                      ["no state_dict found", "'epoch'", "state_dict, model, net, network"]),
    "integer tensor": (lambda p: torch.save({k: v.long() for k, v in member_state(INITIAL_CHANNELS, 0).items()}, p),
                       ["dtype torch.int64"]),
    "non-finite values": (_nan, ["model.0.conv.unit0.conv.bias", "NaN"]),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_member_that_does_not_fit_is_refused_with_its_reason(
    case: str, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, words = REFUSALS[case]
    bad = source / "initial-1.pt"
    make(bad)
    out = tmp_path / "served"
    assert import_folder(source, out) == 2
    message = capsys.readouterr().err
    assert str(bad) in message
    for word in words:
        assert word in message
    assert not out.exists() and not list(tmp_path.glob(".served*"))  # nothing written, no partial directory


def test_another_architecture_is_refused_with_the_shapes_and_the_fitting_options(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "served"
    assert weights("import", source, "--out", out, "--initial", "initial-*.pt") == 2  # the paper's architecture
    message = capsys.readouterr().err
    assert str(source / "initial-0.pt") in message and "channels=[16, 32, 64, 128, 256]" in message
    assert "--channels 4,8,16 --strides 1,2 --res-units 1" in message
    assert not out.exists()


def test_patterns_that_match_nothing_or_both_stages_and_a_used_out_are_refused(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "served"
    assert weights("import", source, "--out", out, "--initial", "fold*/*.pt", *TINY_ARGS) == 2
    assert "matches the initial pattern 'fold*/*.pt'" in capsys.readouterr().err.replace("no file under", "")
    assert weights("import", source, "--out", out, "--initial", "*-0.pt", "--refinement", "refinement-*",
                   *TINY_ARGS) == 2
    assert "matches both the initial and the refinement pattern" in capsys.readouterr().err
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert import_folder(source, out) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_weights_check_runs_each_stage_on_the_imported_ensemble(
    imported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digest = load_engine(settings_for(imported)).checkpoint.digest
    assert weights("check", imported, "--device", "cpu", "--autocast", "off", "--threads", "1") == 0
    report = capsys.readouterr().out
    assert digest in report and "2s-icr (2 initial, 2 refinement members)" in report
    assert "device      cpu, precision float32" in report
    assert "initial " in report and "refinement " in report and "s per pass" in report and "peak RSS" in report


def test_weights_check_refuses_what_the_service_would(imported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    member = imported / "refinement-1.pt"
    member.write_bytes(member.read_bytes()[:-8])
    assert weights("check", imported, "--device", "cpu", "--threads", "1") == 2
    assert "refinement-1.pt does not match its sha256" in capsys.readouterr().err


def test_exported_bundle_loads_with_monai_bundle_tooling(imported: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "gtvt_2sicr"
    assert weights("export", imported, "--bundle", bundle, "--version", "1.2.0") == 0
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["version"] == "1.2.0" and metadata["monai_version"] == monai.__version__
    assert metadata["pytorch_version"] == torch.__version__.split("+")[0]
    assert metadata["network_data_format"]["inputs"]["image"]["num_channels"] == INITIAL_CHANNELS
    assert metadata["refinement_network_data_format"]["inputs"]["image"]["num_channels"] == REFINEMENT_CHANNELS
    readme = (bundle / "docs" / "README.md").read_text()
    back = readme.split("```\n")[-2].strip().replace("BUNDLE", str(bundle)).replace("DIR", str(tmp_path / "back"))
    assert main(shlex.split(back)[1:]) == 0  # the README's import command serves the bundle's weights again
    assert load_engine(settings_for(tmp_path / "back")).stages == ("initial", "refinement")

    engine = load_engine(settings_for(imported))
    images = np.random.default_rng(1).normal(size=(2, *GRID)).astype(np.float32)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    for stage, net_id in (("initial", "network_def"), ("refinement", "refinement_network_def")):
        files = parser.get_parsed_content(f"{stage}_members")
        assert len(files) == 2
        states = [torch.load(f, weights_only=True) for f in files]
        for state in states:
            net = parser.get_parsed_content(net_id, instantiate=True, lazy=False)
            net.load_state_dict(state)
        if stage == "initial":
            np.testing.assert_allclose(_reference_probability(states, INITIAL_CHANNELS, images),
                                       engine.initial_probability(images), atol=1e-5)

    # MONAI's loader: the inference config's network_def with models/model.pt (the first initial member)
    net = load_bundle(name=bundle.name, bundle_dir=bundle.parent, workflow_type="inference", device="cpu")
    assert isinstance(net, torch.nn.Module)
    first = torch.load(imported / "initial-0.pt", weights_only=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in first.items())
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), device="cpu")


def test_zero_click_passes_survive_import_export_and_the_bundles_import_command(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "settled"
    assert weights("import", source, "--out", out, "--initial", "initial-*.pt", "--refinement", "refinement-*.pt",
                   *TINY_ARGS, "--zero-click-passes", "1") == 0
    assert load_engine(settings_for(out)).zero_click_passes == 1
    bundle = tmp_path / "bundle"
    assert weights("export", out, "--bundle", bundle) == 0
    assert json.loads((bundle / "configs" / "inference.json").read_text())["zero_click_passes"] == 1
    readme = (bundle / "docs" / "README.md").read_text()
    assert "1 refinement pass(es) with empty click maps" in readme
    back = readme.split("```\n")[-2].strip().replace("BUNDLE", str(bundle)).replace("DIR", str(tmp_path / "back"))
    assert main(shlex.split(back)[1:]) == 0
    assert load_engine(settings_for(tmp_path / "back")).zero_click_passes == 1
    with pytest.raises(SystemExit):  # argparse refuses what the manifest could not hold
        weights("import", source, "--out", tmp_path / "bad", "--initial", "initial-*.pt", "--zero-click-passes", "9")
    assert not (tmp_path / "bad").exists()
    assert weights("import", source, "--out", tmp_path / "unet", "--initial", "initial-*.pt", *TINY_ARGS,
                   "--zero-click-passes", "1") == 2  # an initial-only import has no refinement to run
    assert not (tmp_path / "unet").exists()


def test_click_overlap_and_reach_survive_import_export_and_the_bundles_import_command(
    source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "max"
    assert weights("import", source, "--out", out, "--initial", "initial-*.pt", "--refinement", "refinement-*.pt",
                   *TINY_ARGS, "--click-overlap", "max", "--click-reach", "foreground=4") == 0
    assert load_engine(settings_for(out)).checkpoint.click_encoding[1:] == ("max", {"foreground": 4.0})
    bundle = tmp_path / "bundle"
    assert weights("export", out, "--bundle", bundle) == 0
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert (config["click_overlap"], config["click_reach_sigma_voxels"]) == ("max", {"foreground": 4.0})
    readme = (bundle / "docs" / "README.md").read_text()
    assert "the larger is kept instead of their sum" in readme and "one of sigma 4 voxels" in readme
    back = readme.split("```\n")[-2].strip().replace("BUNDLE", str(bundle)).replace("DIR", str(tmp_path / "back"))
    assert main(shlex.split(back)[1:]) == 0
    assert load_engine(settings_for(tmp_path / "back")).checkpoint.click_encoding[1:] == ("max", {"foreground": 4.0})
    with pytest.raises(SystemExit):  # argparse names the choices
        weights("import", source, "--out", tmp_path / "bad", "--initial", "initial-*.pt", "--click-overlap", "mean")
    assert not (tmp_path / "bad").exists()


def test_export_refuses_an_existing_folder(imported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").mkdir()
    assert weights("export", imported, "--bundle", tmp_path / "taken") == 2
    assert "exists" in capsys.readouterr().err


def test_initial_only_import_serves_the_mask_and_answers_clicks_409(
    source: Path, tmp_path: Path, ct_pet_files: dict[str, Path]
) -> None:
    out = tmp_path / "initial-only"
    assert import_folder(source, out, refinement=False) == 0
    assert json.loads((out / "manifest.json").read_text())["method"] == "unet"
    settings = settings_for(out)
    engine: Engine = load_engine(settings)
    assert engine.stages == ("initial",) and engine.refinement is None
    with TestClient(create_app(settings, engine)) as client:
        files = {role: (path.name, path.read_bytes()) for role, path in ct_pet_files.items()}
        created = client.post("/v1/sessions", files=files)
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        click = client.post(f"/v1/sessions/{sid}/clicks", json={"clicks": [{"label": "foreground", "voxel": [16, 16, 16]}]})
        assert click.status_code == 409
        assert click.headers["content-type"].startswith("application/problem+json")
        assert click.json()["type"] == "urn:icr:problem:no-refinement-stage"
        assert "no refinement stage" in click.json()["detail"]
        assert client.get(f"/v1/sessions/{sid}").json()["version"] == 0  # the session is unchanged
