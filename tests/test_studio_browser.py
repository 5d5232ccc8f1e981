"""The studio in a real browser: the distribution's headless Chromium, driven by selenium (no browser
download), against `sdlora studio` in its own process, on the toy world.

One scenario end to end: an empty folder; queue the style config for 40 steps; the chart gains points
while it trains; stop, and see "stopped" and a checkpoint; resume from it and see it finish; the sample
gallery; a second run with one option changed, and compare; a caption edited and found on disk. It saves a
screenshot of each page (into docs/studio/ with SDLORA_SCREENSHOTS=docs/studio, which `make screenshots`
sets).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from studio_process import ROOT, StudioProcess, browser_paths, end_runs, headless_chrome

pytest.importorskip("starlette", reason="the studio extra: pip install 'sdlora[studio]'")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402

STEPS = 40


@pytest.fixture
def browser():
    paths = browser_paths()
    if paths is None:
        if os.environ.get("CI"):  # CI installs them (.ci/run): missing there is a failure, not a skip
            pytest.fail("chromium and chromium-driver are not installed")
        pytest.skip("needs the distribution's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver)")
    driver = headless_chrome()
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait(driver, predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:  # an element replaced while being read: look again
            last = error
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last}); "
                         f"page: {driver.current_url}\n{driver.find_element(By.TAG_NAME, 'body').text[:2000]}")


def text(driver, selector: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, selector).text


def run_status(driver, run: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f'#runs tr[data-run="{run}"] .status').text


def chart_points(driver) -> int:
    paths = driver.find_elements(By.CSS_SELECTOR, "#loss-chart path.raw")
    return int(paths[0].get_attribute("data-points")) if paths else 0


class Shots:
    def __init__(self, driver, folder: Path):
        self.driver, self.folder = driver, folder
        folder.mkdir(parents=True, exist_ok=True)

    def take(self, name: str) -> None:
        time.sleep(0.3)  # let the last update paint
        self.driver.save_screenshot(str(self.folder / f"{name}.png"))


def test_the_studio_end_to_end_in_a_browser(browser, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(ROOT / "datasets" / "style-outline", data / "style-outline")  # captions get edited
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    runs = tmp_path / "runs"
    studio = StudioProcess(runs, [data], tmp_path / "studio.log").start()
    shots = Shots(browser, Path(os.environ.get("SDLORA_SCREENSHOTS") or tmp_path / "screenshots"))
    try:
        scenario(browser, studio, data, prompts, shots)
    finally:
        studio.stop()
        end_runs(runs)


def scenario(driver, studio: StudioProcess, data: Path, prompts: Path, shots: Shots) -> None:
    driver.get(studio.url + "/")
    assert "No runs in this folder yet" in text(driver, "#runs")

    # Queue the style config, 40 steps, from the New-run page's TOML view.
    config = (ROOT / "datasets" / "style-outline" / "train.toml").read_text()
    config = config.replace('data = "datasets/style-outline"', f'data = "{data / "style-outline"}"')
    config = config.replace("max_steps = 250", f"max_steps = {STEPS}")
    config += (f'sample_prompts = "{prompts}"\nsample_every = 10\nsample_steps = 8\nsave_every = 10\n'
               "log_every = 1\n")
    driver.get(studio.url + "/new")
    wait(driver, lambda: driver.find_element(By.ID, "toml").get_attribute("value"), 20, "the form's TOML")
    shots.take("new-run")
    driver.find_element(By.CSS_SELECTOR, '[data-tab="toml"]').click()
    driver.find_element(By.ID, "run-name").send_keys("style")
    box = driver.find_element(By.ID, "toml")
    driver.execute_script("arguments[0].value = arguments[1]", box, config)
    driver.find_element(By.ID, "queue-toml").click()
    wait(driver, lambda: driver.current_url.rstrip("/") == studio.url, 20, "the runs page after queueing")
    wait(driver, lambda: run_status(driver, "style") in ("queued", "starting", "running"), 20, "the queued run")

    # Its page: the chart gains points while it trains.
    driver.get(studio.url + "/runs/style")
    wait(driver, lambda: chart_points(driver) >= 2, 180, "the first points of the loss chart")
    first = chart_points(driver)
    wait(driver, lambda: chart_points(driver) > first + 2, 60, "the chart to gain points while training")
    wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#checkpoints tr[data-checkpoint]"), 120,
         "a first checkpoint")
    shots.take("run-training")

    # Stop: "stopped", with a checkpoint to resume from.
    driver.find_element(By.CSS_SELECTOR, '[data-action="stop"]').click()
    wait(driver, lambda: text(driver, "#status") == "stopped", 60, "the run to show as stopped")
    assert "stopped on request" in text(driver, "#detail")
    stopped_at = int(text(driver, "#step"))
    assert 0 < stopped_at < STEPS
    last = f'#checkpoints tr[data-checkpoint="step-{stopped_at:06d}"]'
    wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#checkpoints tr[data-checkpoint]")[-1]
         .get_attribute("data-checkpoint") == f"step-{stopped_at:06d}", 20, "the stop's checkpoint, listed last")

    # Resume from it, and see it finish. (The table is redrawn as the run's state changes: the button is
    # looked up again until a click lands.)
    wait(driver, lambda: driver.find_element(By.CSS_SELECTOR, f"{last} button.resume").click() or True, 20,
         "a click on 'Resume from here'")
    wait(driver, lambda: text(driver, "#status") in ("queued", "starting", "running"), 20, "the resumed run")
    wait(driver, lambda: text(driver, "#status") == "finished", 240, "the resumed run to finish")
    assert int(text(driver, "#step")) == STEPS
    assert (studio.runs / "style" / "style-outline.safetensors").is_file()

    # The gallery: step x prompt, arrow keys and Enter.
    wait(driver, lambda: len(driver.find_elements(By.CSS_SELECTOR, "#gallery tbody tr")) == STEPS // 10, 30,
         "a gallery row per sampled step")
    cells = driver.find_elements(By.CSS_SELECTOR, "#gallery tbody td")
    assert len(cells) == 3 * STEPS // 10
    wait(driver, lambda: all(driver.execute_script("return arguments[0].naturalWidth", cell.find_element(
        By.TAG_NAME, "img")) == 32 for cell in cells), 30, "every sample image (32 px) to load")
    cells[0].click()
    driver.switch_to.active_element.send_keys(Keys.ARROW_DOWN)
    driver.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    focused = driver.switch_to.active_element
    assert (focused.get_attribute("data-row"), focused.get_attribute("data-column")) == ("1", "1")
    focused.send_keys(Keys.ENTER)
    enlarged = driver.find_element(By.ID, "enlarged")
    assert enlarged.is_displayed() and "step 20" in enlarged.text
    shots.take("run-gallery")
    enlarged.click()
    driver.execute_script("window.scrollTo(0, 0)")
    shots.take("run-finished")

    # A second run with one option changed: clone, change the learning rate.
    driver.get(studio.url + "/new?clone=style")
    lr = driver.find_element(By.ID, "f-lr")
    assert float(lr.get_attribute("value")) == pytest.approx(3e-3)
    lr.clear()
    lr.send_keys("0.001")
    driver.find_element(By.ID, "run-name").send_keys("style-lr")
    rank = driver.find_element(By.ID, "f-rank")
    rank.clear()
    rank.send_keys("0")  # an error shows beside its field, with the command line's message
    wait(driver, lambda: "rank must be at least 1" in text(driver, '.field[data-field="rank"] .error'), 20,
         "the rank error beside its field")
    rank.clear()
    rank.send_keys("8")
    wait(driver, lambda: text(driver, '.field[data-field="rank"] .error') == "", 20, "the error to clear")
    driver.find_element(By.ID, "queue-run").click()
    wait(driver, lambda: driver.current_url.rstrip("/") == studio.url, 20, "the runs page")
    wait(driver, lambda: run_status(driver, "style-lr") == "finished", 240, "the second run to finish")
    shots.take("runs")

    # Compare: the changed option, both curves, the same prompt at the same step side by side.
    driver.get(studio.url + "/compare?run=style&run=style-lr")
    rows = {row.find_elements(By.TAG_NAME, "td")[0].text: row for row in
            driver.find_elements(By.CSS_SELECTOR, "#diff tbody tr")}
    assert list(rows) == ["lr"], list(rows)
    assert [cell.text for cell in rows["lr"].find_elements(By.TAG_NAME, "td")[1:]] == ["0.003", "0.001"]
    wait(driver, lambda: len(driver.find_elements(By.CSS_SELECTOR, "#compare-chart path.line")) == 2, 20,
         "two loss curves on one chart")
    images = driver.find_elements(By.CSS_SELECTOR, "#compare-samples img")
    wait(driver, lambda: all(driver.execute_script("return arguments[0].naturalWidth", img) == 32 for img in images),
         20, "both runs' samples")
    shots.take("compare")

    # A caption edited on the dataset page is on disk.
    driver.get(studio.url + "/datasets")
    driver.find_element(By.LINK_TEXT, "data/style-outline").click()
    figure = wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "figure.image"), 20, "the images")[0]
    image = figure.get_attribute("data-image")
    caption = figure.find_element(By.TAG_NAME, "textarea")
    caption.clear()
    caption.send_keys("an outlined test shape")
    figure.find_element(By.CSS_SELECTOR, "button.save-caption").click()
    wait(driver, lambda: figure.find_element(By.CSS_SELECTOR, ".caption-state").text == "saved", 20, "saved")
    on_disk = (data / "style-outline" / image).with_suffix(".txt").read_text()
    assert on_disk == "an outlined test shape"
    shots.take("dataset")

    driver.get(studio.url + "/adapter?path=style/style-outline.safetensors")
    assert "style" in text(driver, "#inspect").lower()
    shots.take("adapter")
