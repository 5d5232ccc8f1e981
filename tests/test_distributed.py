"""Several processes train the adapter one process does: parity, agreement between ranks, faults, resume,
and two machines (here two processes on localhost), all on CPU with gloo.

The reference is always one process with the whole global batch, in this process (`train`). Two
processes split each step's global batch (see steps.shares) and average their gradients; they add the
same numbers in another order, so adapters agree to float32 rounding, amplified a little by AdamW over
the steps: measured here, the largest difference after 6 steps at lr 2e-3 is 1.7e-6; the tolerance is
2e-5, ten times that. Drawing noise and timesteps per process, as sdlora did before, made the two runs
differ by about 10%: far outside it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from sdlora.training.checkpoint import load_state
from sdlora.training.loop import train
from test_prior import class_images  # noqa: F401 (a fixture)
from test_reliability import check_every_file
from test_train import adapter_tensors, assert_adapters_close, config

TOLERANCE = 2e-5
TIMEOUT = 240  # seconds for one multi-process run: ~15 s on 2 cores


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Ten captioned images in two buckets (seven square, three tall): with four images a step, the
    buckets leave short global batches of three, which two processes split unevenly, and two
    processes with two micro-batches each leave one part with no image of its own."""
    folder = tmp_path_factory.mktemp("mixed")
    for i in range(10):
        size = (16, 16) if i < 7 else (16, 64)
        colour = ("red", "blue", "green")[i % 3]
        image = Image.new("RGB", size, "white")
        ImageDraw.Draw(image).ellipse([i % 4, i % 5, i % 4 + 10, i % 5 + 10], fill=colour)
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} disc, number {i}")
    return folder


def flags(**options) -> list[str]:
    args = []
    for key, value in options.items():
        flag = key.replace("_", "-")
        if value is True or value is False:
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return args


def settings(tiny_dir, images, out, **options) -> dict:
    """test_train's config(...) values, as options for the command line too."""
    values = dict(model=tiny_dir, data=images, output_dir=out, resolution=16, batch_size=4, max_steps=6, lr=2e-3,
                  rank=4, seed=7, log_every=1, save_dtype="fp32", lr_scheduler="cosine", warmup_steps=2)
    values.update(options)
    return {key: str(value) if isinstance(value, Path) else value for key, value in values.items()}


def one_process(tiny_dir, images, out, **options) -> Path:
    values = settings(tiny_dir, images, out, **options)
    return train(config(**{**values, "tiny_dir": values.pop("model"), "images": values.pop("data"),
                           "out": values.pop("output_dir")}), quiet=True)


def environment(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def torchrun(tiny_dir, images, out, processes: int = 2, env: dict | None = None, quiet: bool = True, **options):
    """`sdlora train` in `processes` CPU processes under torchrun; the finished process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(free_port()), "-m", "sdlora", "train", *(["--quiet"] if quiet else []),
               *flags(**settings(tiny_dir, images, out, **options))]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env or environment())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def records(out: Path, key: str) -> list[tuple[int, float]]:
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


def assert_same_run(two: Path, one: Path) -> None:
    """The adapter and the logged loss and learning rate of two runs agree (see TOLERANCE)."""
    assert_adapters_close(two / "lora.safetensors", one / "lora.safetensors", atol=TOLERANCE)
    assert records(two, "lr") == records(one, "lr")  # the schedule counts optimizer steps, not processes
    for (step, a), (same, b) in zip(records(two, "loss"), records(one, "loss"), strict=True):
        assert step == same and a == pytest.approx(b, rel=1e-4), (step, a, b)


# ---------------------------------------------------------------- parity


def test_two_processes_train_the_adapter_of_one_with_their_global_batch(tiny_dir, mixed, tmp_path):
    result = torchrun(tiny_dir, mixed, tmp_path / "two", batch_size=2, check_ranks=True, quiet=False)
    assert result.returncode == 0, result.stderr[-3000:]
    one_process(tiny_dir, mixed, tmp_path / "one", batch_size=4)
    assert_same_run(tmp_path / "two", tmp_path / "one")
    output = result.stdout + result.stderr
    assert "batch: 2 per micro-batch x 2 process(es) x 1 accumulation = 4 images per step" in output
    assert "1 bucket(s) hold fewer images than a step's 4: 8x32 (3)" in output
    # the weights moved far more than the tolerance: agreeing within it is not agreeing by standing still
    one = adapter_tensors(tmp_path / "one" / "lora.safetensors")
    assert max(t.abs().max().item() for t in one.values()) > 1000 * TOLERANCE


def test_accumulation_uncached_latents_and_the_text_encoder_split_as_one_batch(tiny_dir, mixed, tmp_path):
    options = dict(cache_latents=False, cache_text=False, train_text_encoder=True, num_workers=1)
    result = torchrun(tiny_dir, mixed, tmp_path / "two", batch_size=1, gradient_accumulation=2, check_ranks=True,
                      **options)
    assert result.returncode == 0, result.stderr[-3000:]
    one_process(tiny_dir, mixed, tmp_path / "one", batch_size=4, **options)
    assert_same_run(tmp_path / "two", tmp_path / "one")


def test_prior_preservation_splits_its_class_batches_too(tiny_dir, mixed, class_images, tmp_path):  # noqa: F811 (the fixture)
    options = dict(reg_data=class_images, prior_loss_weight=0.7, validation_split=0.2, validation_every=3)
    result = torchrun(tiny_dir, mixed, tmp_path / "two", batch_size=2, **options)
    assert result.returncode == 0, result.stderr[-3000:]
    one_process(tiny_dir, mixed, tmp_path / "one", batch_size=4, **options)
    assert_same_run(tmp_path / "two", tmp_path / "one")
    for (step, a), (same, b) in zip(records(tmp_path / "two", "val_loss"), records(tmp_path / "one", "val_loss"),
                                    strict=True):
        assert step == same and a == pytest.approx(b, rel=1e-4)


# ---------------------------------------------------------------- agreement and faults


def test_check_ranks_stops_a_run_whose_processes_drifted_apart(tiny_dir, images, tmp_path):
    result = torchrun(tiny_dir, images, tmp_path / "out", batch_size=2, check_ranks=True,
                      env=environment(SDLORA_TEST_FAULT="perturb:3:1"))
    assert result.returncode != 0
    assert "bug: at step 3 the adapter weights of process 1 differ from process 0's in 1 of" in result.stderr


def test_a_nan_in_one_process_stops_every_process_at_its_step(tiny_dir, images, tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    result = torchrun(tiny_dir, images, out, batch_size=2, log_every=3, save_every=2, max_steps=9,
                      env=environment(SDLORA_TEST_FAULT="nan:5:1"))
    assert result.returncode != 0 and time.monotonic() - started < 120  # no hang
    stopped = [line for line in result.stderr.splitlines() if line.startswith("sdlora: training stopped:")]
    assert len(stopped) == 2, result.stderr[-3000:]  # both processes, the same line
    assert all(line.startswith("sdlora: training stopped: the loss became nan at step 5;") for line in stopped)
    assert check_every_file(out) == [] and not (out / "lora.safetensors").exists()
    # the check at step 6 (a log and a save step) found the NaN of step 5 before writing anything
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_a_killed_process_ends_the_run_and_it_resumes_exactly(tiny_dir, mixed, tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    result = torchrun(tiny_dir, mixed, out, batch_size=2, save_every=2, collective_timeout=30,
                      env=environment(SDLORA_TEST_FAULT="kill:step:3", SDLORA_TEST_FAULT_RANK="1"))
    took = time.monotonic() - started
    assert result.returncode != 0 and took < 90, took
    assert "local_rank: 1" in result.stderr and "Signal 9 (SIGKILL)" in result.stderr  # the lost one, named
    assert check_every_file(out) == []
    assert load_state(out / "checkpoints" / "step-000002")["step"] == 2  # the last checkpoint is whole

    one_process(tiny_dir, mixed, tmp_path / "uninterrupted", batch_size=4)
    resumed = torchrun(tiny_dir, mixed, out, batch_size=2, save_every=2, resume="latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_adapters_close(out / "lora.safetensors", tmp_path / "uninterrupted" / "lora.safetensors", atol=TOLERANCE)

    # another process count resumes exactly when the global batch is the same, and is refused otherwise
    alone = tmp_path / "alone"
    import shutil

    shutil.copytree(out / "checkpoints", alone / "checkpoints")
    one_process(tiny_dir, mixed, alone, batch_size=4, resume="latest", save_every=2)
    assert_adapters_close(alone / "lora.safetensors", tmp_path / "uninterrupted" / "lora.safetensors",
                          atol=TOLERANCE)
    from sdlora.errors import ConfigError

    with pytest.raises(ConfigError, match=r"it trained 4 images per step, this run 2 \(2 x 1 processes x 1 "
                                          r"accumulation\): keep batch_size x processes x gradient_accumulation"):
        one_process(tiny_dir, mixed, alone, batch_size=2, resume="latest", save_every=2)


# ---------------------------------------------------------------- two machines


def test_two_machines_on_localhost_train_the_adapter_of_one(tiny_dir, mixed, tmp_path):
    """accelerate launch as machine 0 and machine 1 of a two-machine run, one process each."""
    port, out = free_port(), tmp_path / "two-machines"
    args = flags(**settings(tiny_dir, mixed, out, batch_size=2, check_ranks=True))
    machines = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
         "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", str(port),
         "-m", "sdlora", "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=environment()) for rank in (0, 1)]
    for machine in machines:
        _, stderr = machine.communicate(timeout=TIMEOUT)
        assert machine.returncode == 0, stderr[-3000:]
    one_process(tiny_dir, mixed, tmp_path / "one", batch_size=4)
    assert_same_run(out, tmp_path / "one")


def test_the_draws_of_a_global_batch_do_not_depend_on_its_split():
    from sdlora.training.loss import Draws
    from sdlora.training.steps import shares, step_generator

    def drawn(processes: int, accumulation: int, batch: int) -> torch.Tensor:
        rows = []
        for process in range(processes):
            for share in shares(7, batch, processes, accumulation, process):
                if share.weight:
                    draws = Draws(step_generator(3, 9), share.rows, share.size)
                    rows.append((share.rows.start, draws.normal(2, 2), draws.integers(0, 1000)))
        return torch.cat([noise.flatten(1) for _, noise, _ in sorted(rows, key=lambda r: r[0])])

    whole = drawn(1, 1, 8)
    assert whole.shape == (7, 4)
    for split in ((2, 1, 4), (2, 2, 2), (4, 1, 2), (1, 4, 2), (3, 1, 3)):
        torch.testing.assert_close(drawn(*split), whole, rtol=0, atol=0)


def test_shares_weigh_every_image_of_a_step_alike():
    from sdlora.training.steps import shares

    for size, batch, processes, accumulation in ((4, 2, 2, 1), (3, 2, 2, 1), (3, 1, 2, 2), (1, 1, 2, 2), (8, 2, 2, 2)):
        parts = [share for p in range(processes) for share in shares(size, batch, processes, accumulation, p)]
        covered = sorted(row for share in parts if share.weight for row in share.rows)
        assert covered == list(range(size))  # every image once
        # gradient = mean over processes of the sum over micro-batches of weight x mean of its rows
        per_image = {row: share.weight / len(share.rows) / processes for share in parts if share.weight
                     for row in share.rows}
        assert all(value == pytest.approx(1 / size) for value in per_image.values())
        assert len(parts) == processes * accumulation  # a part with no image still runs: weight 0
