"""The studio's API with an in-process client: statuses from the facts, the queue, steering, security.

Runs here are real `sdlora train` processes on the tiny pipeline, started by the studio's queue.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytest.importorskip("starlette", reason="the studio extra: pip install 'sdlora[studio]'")
from starlette.testclient import TestClient  # noqa: E402

from sdlora.reliability.runlock import RunLock  # noqa: E402
from sdlora.studio import facts  # noqa: E402
from sdlora.studio.app import Studio, create_app  # noqa: E402
from sdlora.studio.queue import Queue  # noqa: E402
from studio_process import tiny_run_toml, wait_for  # noqa: E402

SAME_ORIGIN = {"origin": "http://localhost"}


def client(tmp_path, data=(), **settings) -> tuple[Studio, TestClient]:
    studio = Studio(runs=tmp_path / "runs", data=list(data), **settings)
    return studio, TestClient(create_app(studio, tick=False), base_url="http://localhost")


def status(api: TestClient, run: str) -> dict:
    return next(row for row in api.get("/api/runs").json()["runs"] if row["name"] == run)


def write_run(folder: Path, steps: int = 5, adapter: bool = False, events: list[dict] | None = None) -> Path:
    (folder / "logs").mkdir(parents=True)
    (folder / "config.toml").write_text('name = "lora"\nmax_steps = 10\n')
    with (folder / "logs" / "metrics.jsonl").open("w") as file:
        for step in range(1, steps + 1):
            file.write(json.dumps({"step": step, "loss": 1.0 / step, "loss_smoothed": 1.0, "lr": 1e-4,
                                   "time": step * 0.5}) + "\n")
    if events:
        (folder / "logs" / "events.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))
    if adapter:
        time.sleep(0.01)
        (folder / "lora.safetensors").write_bytes(b"x")
    return folder


# ---------------------------------------------------------------- statuses


def test_status_is_read_from_the_lock_and_the_files(tmp_path):
    studio, api = client(tmp_path)
    runs = studio.runs
    write_run(runs / "done", adapter=True, events=[{"event": "finished", "step": 5}])
    write_run(runs / "broke", events=[{"event": "started", "step": 0, "total_steps": 10},
                                      {"event": "failed", "step": 5, "message": "the loss became nan at step 5"}])
    write_run(runs / "asked", events=[{"event": "started", "step": 0, "total_steps": 10},
                                      {"event": "stopped", "step": 5, "reason": "requested"}])
    write_run(runs / "killed", events=[{"event": "started", "step": 0, "total_steps": 10}])
    write_run(runs / "live", events=[{"event": "started", "step": 0, "total_steps": 10}])
    with RunLock(runs / "live"):
        rows = {row["name"]: row for row in api.get("/api/runs").json()["runs"]}
        assert rows["live"]["status"] == "running" and rows["live"]["pid"] == os.getpid()
        assert rows["live"]["step"] == 5 and rows["live"]["total_steps"] == 10
        assert rows["live"]["eta_s"] == pytest.approx(2.5)  # 5 steps left at 0.5 s a step
    rows = {row["name"]: row for row in api.get("/api/runs").json()["runs"]}
    assert rows["live"]["status"] == "stopped"  # the lock was released without a finished adapter
    assert (rows["done"]["status"], rows["done"]["adapter"]) == ("finished", "lora.safetensors")
    assert rows["broke"]["status"] == "failed" and "nan at step 5" in rows["broke"]["detail"]
    assert rows["asked"]["status"] == "stopped" and "on request at step 5" in rows["asked"]["detail"]
    assert rows["killed"]["status"] == "stopped" and "without a word" in rows["killed"]["detail"]


def test_a_run_killed_with_sigkill_shows_as_stopped_within_two_seconds(tmp_path):
    folder = write_run(tmp_path / "runs" / "victim")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from sdlora.reliability.runlock import RunLock
        RunLock({str(folder)!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)""")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert facts.run_facts(folder).status == "running"
        holder.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: facts.run_facts(folder).status == "stopped", 2.0, "the killed run to show as stopped")
        assert time.monotonic() - killed < 2.0
        assert (folder / ".sdlora.lock").exists()  # the file a kill leaves says nothing: the lock does
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- the queue, steering


def test_queue_start_stop_resume_and_finish_equal_an_unwatched_run(tiny_dir, images, tmp_path):
    studio, api = client(tmp_path)
    body = tiny_run_toml(tiny_dir, images, max_steps=30)
    with api:
        answer = api.post("/api/runs?run=watched", content=body, headers={**SAME_ORIGIN,
                                                                          "content-type": "application/toml"})
        assert answer.status_code == 201, answer.text
        assert status(api, "watched")["status"] == "queued"
        studio.tick()
        wait_for(lambda: status(api, "watched")["status"] == "running", 120, "the run to take its lock")
        wait_for(lambda: status(api, "watched")["step"] >= 3, 120, "three steps")
        assert api.post("/api/runs/watched/stop", headers=SAME_ORIGIN).status_code == 202
        wait_for(lambda: status(api, "watched")["status"] == "stopped", 60, "the stop")
        stopped = status(api, "watched")
        assert stopped["checkpoints"] and "on request" in stopped["detail"], stopped
        assert stopped["step"] < 30 and not (studio.runs / "watched" / "lora.safetensors").exists()
        assert api.post("/api/runs/watched/stop", headers=SAME_ORIGIN).status_code == 400  # not running now
        answer = api.post("/api/runs/watched/resume", json={"checkpoint": stopped["checkpoints"][-1]},
                          headers=SAME_ORIGIN)
        assert answer.status_code == 201, answer.text
        studio.tick()
        wait_for(lambda: status(api, "watched")["status"] == "finished", 180, "the resumed run to finish")
    unwatched = tmp_path / "unwatched"
    config = tmp_path / "unwatched.toml"
    config.write_text(body)
    done = subprocess.run([sys.executable, "-m", "sdlora", "train", "--quiet", "--config", str(config),
                           "--output-dir", str(unwatched)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ours, reference = load_file(studio.runs / "watched" / "lora.safetensors"), load_file(unwatched / "lora.safetensors")
    assert ours.keys() == reference.keys()
    for key in ours:  # a stop and a resume repeat the uninterrupted run exactly
        assert (ours[key] - reference[key]).abs().max() <= 1e-6, key


def test_the_queue_keeps_snapshots_order_and_cancels_across_restarts(tiny_dir, images, tmp_path):
    studio, api = client(tmp_path)
    for name in ("a", "b", "c"):
        body = tiny_run_toml(tiny_dir, images, rank=4 if name != "b" else 2)
        answer = api.post(f"/api/runs?run={name}", content=body,
                          headers={**SAME_ORIGIN, "content-type": "application/toml"})
        assert answer.status_code == 201, answer.text
    queue = api.get("/api/queue").json()["queue"]
    ids = {entry["run"]: entry["id"] for entry in queue}
    assert [entry["run"] for entry in queue] == ["a", "b", "c"]
    assert api.post(f"/api/queue/{ids['c']}", json={"index": 0}, headers=SAME_ORIGIN).status_code == 200
    assert api.delete(f"/api/queue/{ids['a']}", headers=SAME_ORIGIN).status_code == 200
    snapshot = Queue(studio.runs).get(ids["b"]).config
    assert "rank = 2" in snapshot and f"output_dir = {json.dumps(str(studio.runs / 'b'))}" in snapshot
    studio.queue.close()
    again = Queue(studio.runs)  # a restarted studio (the file is all there is)
    assert [(entry.run, entry.state) for entry in again.entries()] == [("c", "waiting"), ("b", "waiting")]
    assert again.get(ids["b"]).config == snapshot
    assert again.get(ids["a"]).state == "cancelled"


def test_a_config_error_is_the_command_lines_message_under_its_key(tiny_dir, images, tmp_path):
    from sdlora.errors import ConfigError
    from sdlora.training.config import build, validate

    studio, api = client(tmp_path)
    answer = api.post("/api/runs?run=bad", content=tiny_run_toml(tiny_dir, images, rank=0),
                      headers={**SAME_ORIGIN, "content-type": "application/toml"})
    assert answer.status_code == 400
    with pytest.raises(ConfigError) as cli:
        validate(build({"model": str(tiny_dir), "data": str(images), "output_dir": str(tmp_path / "x"), "rank": 0}))
    assert answer.json()["errors"]["rank"] == str(cli.value)
    answer = api.post("/api/runs?run=bad", content=tiny_run_toml(tiny_dir, images) + "rnak = 3\n",
                      headers={**SAME_ORIGIN, "content-type": "application/toml"})
    assert answer.status_code == 400 and "rnak" in json.dumps(answer.json())
    assert api.get("/api/queue").json()["queue"] == []


def test_a_request_for_a_running_run_lands_in_its_control_folder(tmp_path):
    studio, api = client(tmp_path)
    folder = write_run(studio.runs / "live")
    assert api.post("/api/runs/live/save", headers=SAME_ORIGIN).status_code == 400  # not running
    with RunLock(folder):
        answer = api.post("/api/runs/live/save", headers=SAME_ORIGIN)
        assert answer.status_code == 202
        assert [path.name for path in (folder / "control").iterdir()] == [answer.json()["file"]]
        assert api.post("/api/runs/live/explode", headers=SAME_ORIGIN).status_code == 404


# ---------------------------------------------------------------- security


def test_a_token_is_needed_off_loopback_and_changes_need_it_in_a_header(tmp_path):
    studio, api = client(tmp_path, host="0.0.0.0", token="s3cret")
    write_run(studio.runs / "r")
    assert api.get("/api/runs").status_code == 401
    assert api.get("/").status_code == 401
    assert api.get("/api/runs", headers={"x-sdlora-token": "wrong"}).status_code == 401
    assert api.get("/api/runs", headers={"x-sdlora-token": "s3cret"}).status_code == 200
    assert api.get("/api/runs", headers={"authorization": "Bearer s3cret"}).status_code == 200
    page = api.get("/?token=s3cret")  # the printed address: the browser keeps the token in a cookie
    assert page.status_code == 200 and "sdlora_token" in page.headers["set-cookie"]
    assert api.get("/api/runs").status_code == 200  # now with the cookie
    # A change with the cookie alone (what a cross-site form would send) is refused.
    assert api.post("/api/runs/r/save", headers=SAME_ORIGIN).status_code == 401
    assert api.post("/api/runs/r/save", headers={**SAME_ORIGIN, "x-sdlora-token": "s3cret"}).status_code == 400


def test_changes_come_from_the_studios_own_pages_only(tmp_path):
    studio, api = client(tmp_path)
    with RunLock(write_run(studio.runs / "live")):
        assert api.post("/api/runs/live/save").status_code == 403  # no Origin, no header
        assert api.post("/api/runs/live/save", headers={"origin": "http://evil.example"}).status_code == 403
        assert api.post("/api/runs/live/save", headers={"referer": "http://evil.example/x"}).status_code == 403
        assert api.post("/api/runs/live/save", headers={"origin": "http://localhost"}).status_code == 202
        assert api.post("/api/runs/live/save", headers={"referer": "http://localhost/runs/live"}).status_code == 202
    # A name rebound to 127.0.0.1 by another site: its pages would be same-origin with themselves.
    studio.host = "127.0.0.1"
    assert api.get("/api/runs", headers={"host": "evil.example"}).status_code == 403
    assert api.get("/api/runs", headers={"host": "localhost:7860"}).status_code == 200


def test_files_are_served_from_inside_their_folders_only(tmp_path, images):
    studio, api = client(tmp_path, data=[images])
    write_run(studio.runs / "r", adapter=True)
    (tmp_path / "secret.txt").write_text("private")
    (studio.runs / "r" / "link.txt").symlink_to(tmp_path / "secret.txt")
    assert api.get("/files/runs/r/lora.safetensors").content == b"x"
    assert api.get("/files/data/0/0.png").status_code == 200
    for path in ("/files/runs/../secret.txt", "/files/runs/%2e%2e/secret.txt", "/files/runs/r/link.txt",
                 "/files/runs/r/..%2f..%2fsecret.txt", "/files/data/0/..%2f..%2fsecret.txt", "/files/data/1/0.png",
                 "/files/runs/.studio/queue.sqlite", "/files/runs//etc/passwd"):
        answer = api.get(path)
        assert answer.status_code in (403, 404), (path, answer.status_code)
        assert b"private" not in answer.content


def test_request_bodies_are_bounded(tmp_path):
    studio, api = client(tmp_path)
    answer = api.post("/api/runs?run=big", content=b"#" * (2 << 20),
                      headers={**SAME_ORIGIN, "content-type": "application/toml"})
    assert answer.status_code == 413


# ---------------------------------------------------------------- captions, escaping, metrics


def test_a_caption_is_escaped_in_the_page_and_an_edit_over_a_changed_file_is_refused(tmp_path):
    from PIL import Image

    data = tmp_path / "data" / "set"
    data.mkdir(parents=True)
    Image.new("RGB", (16, 16), "red").save(data / "a.png")
    (data / "a.txt").write_text('<script>alert("x")</script> a red square')
    studio, api = client(tmp_path, data=[tmp_path / "data"])
    page = api.get("/dataset?root=0&folder=set").text
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page
    described = api.get("/api/dataset?root=0&folder=set").json()
    image = next(item for item in described["images"] if item["path"] == "a.png")
    saved = api.put("/api/dataset/caption?root=0&folder=set", headers=SAME_ORIGIN,
                    json={"image": "a.png", "text": "a red square, outlined", "version": image["version"]})
    assert saved.status_code == 200, saved.text
    assert (data / "a.txt").read_text() == "a red square, outlined"
    (data / "a.txt").write_text("edited in another editor")
    stale = api.put("/api/dataset/caption?root=0&folder=set", headers=SAME_ORIGIN,
                    json={"image": "a.png", "text": "my edit", "version": saved.json()["version"]})
    assert stale.status_code == 409 and stale.json()["current"] == "edited in another editor"
    assert (data / "a.txt").read_text() == "edited in another editor"
    outside = api.put("/api/dataset/caption?root=0&folder=set", headers=SAME_ORIGIN,
                      json={"image": "../../x.png", "text": "t", "version": ""})
    assert outside.status_code == 403


def test_metrics_of_a_long_run_come_back_downsampled_and_live_points_after_a_step(tmp_path):
    studio, api = client(tmp_path)
    write_run(studio.runs / "long", steps=100_000)
    series = api.get("/api/runs/long/metrics?points=500").json()["series"]
    assert 0 < len(series["loss"]["step"]) <= 2000 and series["loss"]["step"][-1] == 100_000
    assert max(series["loss"]["value"]) == 1.0  # step 1's loss, the highest, is kept
    after = api.get("/api/runs/long/metrics?after=99990").json()["series"]["loss"]
    assert after["step"] == list(range(99_991, 100_001))


def test_every_page_renders_with_runs_in_every_state(tiny_dir, images, tmp_path):
    studio, api = client(tmp_path, data=[images.parent])
    write_run(studio.runs / "done", adapter=True, events=[{"event": "finished", "step": 5}])
    write_run(studio.runs / "broke", events=[{"event": "failed", "step": 5, "message": "<b>nan</b>"}])
    assert api.post("/api/runs?run=waiting", content=tiny_run_toml(tiny_dir, images),
                    headers={**SAME_ORIGIN, "content-type": "application/toml"}).status_code == 201
    pages = ["/", "/runs/done", "/runs/broke", "/runs/waiting", "/compare?run=done&run=broke", "/compare", "/new",
             "/new?clone=done", "/datasets", f"/dataset?root=0&folder={images.name}", "/adapter"]
    for page in pages:
        answer = api.get(page)
        assert answer.status_code == 200, (page, answer.text[-2000:])
        assert "<b>nan</b>" not in answer.text  # a message from a run is text, never markup
    assert "&lt;b&gt;nan&lt;/b&gt;" in api.get("/").text


def test_a_strength_grid_of_a_checkpoint_is_made_in_the_background(tiny_dir, images, tmp_path):
    studio, api = client(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    config = tmp_path / "run.toml"
    config.write_text(tiny_run_toml(tiny_dir, images, max_steps=2, save_every=2, sample_prompts=str(prompts)))
    done = subprocess.run([sys.executable, "-m", "sdlora", "train", "--quiet", "--config", str(config),
                           "--output-dir", str(studio.runs / "r")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert api.get("/api/runs/r/checkpoints/step-000002/grid").json()["state"] == "none"
    assert api.post("/api/runs/r/checkpoints/step-000009/grid", headers=SAME_ORIGIN).status_code == 404
    job = api.post("/api/runs/r/checkpoints/step-000002/grid", headers=SAME_ORIGIN).json()
    assert job["state"] in ("running", "done")
    job = wait_for(lambda: (lambda j: j if j["state"] in ("done", "failed") else None)(
        api.get("/api/runs/r/checkpoints/step-000002/grid").json()), 180, "the grid")
    assert job["state"] == "done", job
    from PIL import Image

    grid = api.get(job["url"])
    assert grid.status_code == 200
    with Image.open(io.BytesIO(grid.content)) as image:
        assert image.width >= 5 * 16  # strengths 0, 0.25, 0.5, 0.75 and 1, side by side
    # the toy-world scores are offered for runs of the toy model only
    assert api.get("/api/runs/r").json()["toy"]["available"] is False
    assert api.post("/api/runs/r/toy-scores", headers=SAME_ORIGIN).status_code == 400


def test_the_event_stream_sends_new_metrics_points_as_they_are_written(tmp_path):
    import threading

    import httpx
    import uvicorn

    from studio_process import free_port

    studio, _ = client(tmp_path)
    folder = write_run(studio.runs / "live", steps=3)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(studio, tick=False), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 20, "the server")
        events = []
        with httpx.stream("GET", f"http://127.0.0.1:{port}/api/events?run=live&after=3", timeout=20) as stream:
            name = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((name, json.loads(line.removeprefix("data: "))))
                    if name == "runs" and len(events) == 1:  # the stream is up: write a step
                        written = time.monotonic()
                        with (folder / "logs" / "metrics.jsonl").open("a") as file:
                            file.write(json.dumps({"step": 4, "loss": 0.125, "time": 2.0}) + "\n")
                    if name == "metrics":
                        break
        assert events[0][0] == "runs" and events[0][1]["runs"][0]["name"] == "live"
        assert events[-1][1]["series"]["loss"] == {"step": [4], "value": [0.125]}
        assert time.monotonic() - written < 1.0  # the goal: a line reaches the page within a second
    finally:
        server.should_exit = True
        thread.join(10)
