"""The studio as users run it: `sdlora studio` in a process of its own, on a free port (for the browser
and reliability tests)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_run_toml(tiny_dir, images, **options) -> str:
    """A training config for the tiny pipeline (a few seconds a run), as a TOML body."""
    values = dict(model=str(tiny_dir), data=str(images), resolution=16, batch_size=4, lr=2e-3, rank=4, seed=7,
                  log_every=1, save_dtype="fp32", max_steps=12)
    values.update(options)
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in values.items()) + "\n"


def wait_for(predicate, timeout: float, what: str, step: float = 0.1, retry_on: tuple = ()):
    """The first true value of `predicate`, polled every `step` s; an exception in `retry_on` counts as false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except retry_on:
            value = None
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def headless_chrome():
    """The distribution's Chromium, headless, through its own driver (never a downloaded one)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StudioProcess:
    def __init__(self, runs: Path, data: list[Path], log: Path, port: int | None = None):
        self.runs, self.data, self.log = runs, data, log
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "StudioProcess":
        command = [sys.executable, "-m", "sdlora", "studio", "--runs", str(self.runs), "--port", str(self.port)]
        for folder in self.data:
            command += ["--data", str(folder)]
        with self.log.open("ab") as log:
            # Its own session, as a user's terminal would hold it: its trainings live in theirs.
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the studio ended at start: {self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"the studio did not listen on {self.port} within {timeout} s")

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would end it."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def browser_paths() -> tuple[str, str] | None:
    """The distribution's chromium and its driver, or None when they are not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def end_runs(runs: Path) -> None:
    """Stop every training still running in `runs` (a failed test must not leave them behind)."""
    from sdlora.studio.facts import lock_holder

    for folder in runs.iterdir() if runs.is_dir() else []:
        pid = lock_holder(folder)
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
