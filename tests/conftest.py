"""Shared fixtures: a real redis-server for the run, small checkpoints, images and phantom cases."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.bench.processes import start_redis
from service.bench.stats import BenchError


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Torch on one CPU thread for the whole run.

    The tests' networks are tiny: two threads barely beat one on idle cores and run several
    times slower when another job holds a core. Tests that load an engine set one thread anyway;
    here every test sees the same setting, whatever ran before it.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server for this test run: REDIS_URL if given, else a redis-server started here."""
    given = os.environ.get("REDIS_URL")
    if given:
        yield given
        return
    try:
        server, url = start_redis(tmp_path_factory.mktemp("redis"))
    except BenchError as error:
        pytest.exit(f"{error}; or set REDIS_URL", 2)
    yield url
    server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of its own for each test, so tests never see each other's keys."""
    return f"test-{uuid.uuid4().hex[:12]}"


TINY_GRID = (32, 32, 32)


def random_weights(directory: Path, architecture: Any, grid_shape: tuple[int, int, int], seed: int) -> Path:
    """Five initial + five refinement members of ``architecture``, randomly initialised from ``seed``."""
    import torch

    from service.engine.checkpoints import write_checkpoint
    from service.engine.networks import INITIAL_CHANNELS, REFINEMENT_CHANNELS, build_unet

    torch.manual_seed(seed)
    stages = {
        "initial": [build_unet(INITIAL_CHANNELS, architecture) for _ in range(5)],
        "refinement": [build_unet(REFINEMENT_CHANNELS, architecture) for _ in range(5)],
    }
    write_checkpoint(directory, stages, architecture=architecture, grid_shape=grid_shape, spacing_mm=1.0,
                     description="random test weights")
    return directory


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A narrow UNet on a 32^3 grid: passes take milliseconds."""
    from service.engine.networks import Architecture

    architecture = Architecture(channels=(4, 8, 16), strides=(1, 2), num_res_units=1)
    return random_weights(tmp_path_factory.mktemp("weights"), architecture, TINY_GRID, seed=0)


@pytest.fixture(scope="session")
def ct_pet_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small CT (HU, 1 x 1 x 2.5 mm, RAS-flipped axes) and PET (SUV, 4 mm, other origin) pair."""
    import numpy as np

    from service.imaging.nifti import write_nifti

    ct_affine = np.array([[-1.0, 0, 0, 24.0], [0, -1.0, 0, 20.0], [0, 0, 2.5, -25.0], [0, 0, 0, 1]])
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in (48, 44, 20)), indexing="ij"), -1)
    world = ijk @ ct_affine[:3, :3].T + ct_affine[:3, 3]
    tumour = np.linalg.norm(world - np.array([2.0, -3.0, 1.0]), axis=-1) < 7.0
    ct = np.where(tumour, 60.0, 40.0).astype(np.int16)
    pet_affine = np.diag([4.0, 4.0, 4.0, 1.0])
    pet_affine[:3, 3] = (-30.0, -26.0, -28.0)
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in (15, 14, 14)), indexing="ij"), -1)
    world = ijk @ pet_affine[:3, :3].T + pet_affine[:3, 3]
    pet = 1.0 + 9.0 * np.exp(-np.sum((world - np.array([2.0, -3.0, 1.0])) ** 2, axis=-1) / (2 * 6.0**2))
    directory = tmp_path_factory.mktemp("images")
    paths = {"ct": directory / "case_ct.nii.gz", "pet": directory / "case_pt.nii.gz"}
    paths["ct"].write_bytes(write_nifti(ct, ct_affine))
    paths["pet"].write_bytes(write_nifti(pet.astype(np.float32), pet_affine))
    return paths


@pytest.fixture(scope="session")
def phantom_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classic phantom cases (seed 11) in the HECKTOR layout, written once for every test that reads them.

    Shared: a test reads these files and writes its own outputs (caches, runs, reports) elsewhere.
    """
    from service.science.phantoms import write_cases

    directory = tmp_path_factory.mktemp("phantoms")
    write_cases(directory, 2, seed=11)
    return directory
