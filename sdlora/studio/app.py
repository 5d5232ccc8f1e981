"""The studio's pages and JSON API, as one Starlette app; `serve` runs it with uvicorn.

The pages are templates filled from the same functions the API answers with, and their scripts read the
API: there is no second source of truth for what a page shows. Routes are listed at the end of the file
(`create_app`); docs/studio.md documents each.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import threading
import time
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import ConfigError, SdloraError
from ..training import control
from ..training.checkpoint import ADAPTER_FILE
from ..training.config import to_toml
from ..training.setup import RunPaths, read_prompts, resume_folder
from . import datasets, facts, forms, security
from ..toy.pretrain import is_toy_model
from .jobs import Job
from .metrics import MetricsCache, chart_series, records_after
from .queue import STUDIO_FOLDER, Queue, Scheduler, check_run_name

# How often the event stream looks at the files. With the page drawing at most twice a second, a new
# metrics line is on the page within a second (bench/studio.py measures it).
POLL_S = 0.5
# The studio's own threads run at this niceness (Linux), below the trainings they watch; the thread that
# starts trainings keeps the normal priority, so the runs it starts keep it too.
NICENESS = 10


@dataclass
class Studio:
    """What the routes share: the folders, the queue and its scheduler, the metrics cache, the security settings."""

    runs: Path
    data: list[Path]
    host: str = "127.0.0.1"
    token: str | None = None
    parallel: int = 1
    queue: Queue = field(init=False)
    scheduler: Scheduler = field(init=False)
    metrics: MetricsCache = field(default_factory=MetricsCache)

    def __post_init__(self):
        self.runs.mkdir(parents=True, exist_ok=True)
        self.queue = Queue(self.runs)
        self.scheduler = Scheduler(self.queue, self.parallel)
        self._ticking = threading.Event()

    # ------------------------------------------------------------ runs

    def folder(self, run: str) -> Path:
        check_run_name(run)
        folder = self.runs / run
        if not facts.is_run_folder(folder) and not any(entry.run == run for entry in self.queue.entries()):
            raise HTTPException(404, f"no run {run!r} in {self.runs}")
        return folder

    def states(self) -> dict:
        """Every run with its status (queued and starting ones included) and the queue."""
        runs = facts.all_runs(self.runs)
        starting = self.scheduler.starting()
        queued = {entry.run: entry for entry in self.queue.entries(("waiting",))}
        rows = []
        for run in runs:
            row = run.to_json()
            if run.status != "running" and run.name in starting:
                row["status"], row["detail"] = "starting", "loading the model"
            elif run.status != "running" and run.name in queued:
                row["status"], row["detail"] = "queued", _queued_detail(queued[run.name])
            rows.append(row)
        known = {run.name for run in runs}
        for name, entry in {**queued, **starting}.items():
            if name not in known:
                rows.append(facts.RunFacts(name=name, status="starting" if name in starting else "queued",
                                           detail=_queued_detail(entry)).to_json())
        return {"runs": rows, "queue": [entry.to_json() | {"config": None} for entry in self.queue.entries()]}

    def run_state(self, run: str) -> dict:
        folder = self.folder(run)
        state = next((row for row in self.states()["runs"] if row["name"] == run), {"name": run})
        config_text = (folder / "config.toml").read_text() if (folder / "config.toml").is_file() else ""
        prompts = sample_prompts(folder)
        return {**state, "config": config_text, "events": control.read_events(folder / "logs"),
                "log": facts.tail(folder / "logs" / facts.CONSOLE_LOG, 40),
                "samples": {"steps": sample_steps(folder), "prompts": prompts},
                "checkpoints": [{"name": name, "grid": grid_job(folder, name).state()}
                                for name in state.get("checkpoints", [])],
                "toy": toy_job(folder).state() | {"available": is_toy_run(folder)}}

    def tick(self) -> None:
        """Once a second: start what the queue may start, and bring every run's metrics up to date, so that a
        run's page finds its chart's points read already (a long run's log takes a while to read first)."""
        runs = facts.all_runs(self.runs)
        self.scheduler.tick(sum(1 for run in runs if run.status == "running"))
        for run in runs:
            self.metrics.read(self.runs / run.name / "logs" / "metrics.jsonl")

    def start_ticking(self) -> threading.Thread:
        def loop():
            while True:
                try:
                    self.tick()
                except Exception:  # a bug: shown, and the queue goes on rather than stopping for good
                    traceback.print_exc()
                if self._ticking.wait(1.0):
                    return

        thread = threading.Thread(target=loop, name="sdlora-studio-queue", daemon=True)
        thread.start()
        return thread

    def stop_ticking(self) -> None:
        self._ticking.set()

    # ------------------------------------------------------------ queueing

    def queue_run(self, text: str, run: str | None, form: dict | None = None) -> dict:
        """Queue a new run from a TOML config (or the New-run form's values) into RUNS/<run>; the run's name
        defaults to the config's output folder's name (or adapter name), made unique."""
        self.scheduler.retire()  # an entry whose run ended no longer holds its name
        if run:
            name = check_run_name(run)
        else:
            wanted = (form.get("output_dir") or form.get("name")) if form is not None else _toml_name(text)
            name = self._free_name(Path(str(wanted or "run")).name)
        folder = self.runs / name
        overrides = {"output_dir": str(folder), "resume": None}
        config, errors = (forms.config_from_form(form, overrides) if form is not None
                          else forms.config_from_toml(text, overrides))
        if errors:
            return {"errors": errors}
        resume_folder(config, RunPaths(folder, config.name))  # a finished adapter or old checkpoints are refused
        entry = self.queue.add(name, to_toml(config))
        return {"entry": entry.to_json(), "run": name}

    def check_form(self, form: dict) -> dict:
        """The New-run form's errors and TOML, checked as the queue would (the output folder is the studio's)."""
        overrides = {"output_dir": str(self.runs / STUDIO_FOLDER / "check"), "resume": None}
        config, errors = forms.config_from_form(form, overrides)
        config = config or forms.unvalidated_config(form, overrides)
        return {"errors": errors, "toml": to_toml(config) if config else None}

    def _free_name(self, wanted: str) -> str:
        base = "".join(c if c.isalnum() or c in "._-" else "-" for c in wanted).strip(".-") or "run"
        taken = {entry.run for entry in self.queue.entries()}
        name, n = base, 1
        while name in taken or facts.is_run_folder(self.runs / name):
            n += 1
            name = f"{base}-{n}"
        return name

    def resume(self, run: str, checkpoint: str | None) -> dict:
        """Queue the run's own config again, continuing from one of its checkpoints (the latest by default)."""
        folder = self.folder(run)
        self.scheduler.retire()
        state = facts.run_facts(folder)
        if state.status == "running":
            raise ConfigError(f"run {run} is running: stop it first")
        if not state.checkpoints:
            raise ConfigError(f"run {run} has no checkpoint to resume from")
        if checkpoint is not None and checkpoint not in state.checkpoints:
            raise ConfigError(f"run {run} has no checkpoint {checkpoint!r}; it has {', '.join(state.checkpoints)}")
        config, errors = forms.config_from_toml((folder / "config.toml").read_text(),
                                                {"output_dir": str(folder), "resume": None})
        if errors:
            raise ConfigError(f"{folder / 'config.toml'}: " + "; ".join(errors.values()))
        resume = str(folder / "checkpoints" / checkpoint) if checkpoint else "latest"
        entry = self.queue.add(run, to_toml(config), resume=resume)
        return {"entry": entry.to_json(), "run": run}


def _toml_name(text: str) -> str | None:
    """The output folder's (or else the adapter's) name a TOML config gives, for the run's default name."""
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None  # the config's own check says what is wrong
    for key in ("output_dir", "name"):
        if isinstance(values.get(key), str) and values[key]:
            return values[key]
    return None


def _queued_detail(entry) -> str:
    return f"resume from {Path(entry.resume).name}" if entry.resume else "waiting in the queue"


# ---------------------------------------------------------------- samples, grids, scores


def sample_prompts(folder: Path) -> list[str]:
    """The run's sample prompts, from the file its config names (the sheets hold one cell per prompt)."""
    try:
        config = facts.read_toml(folder / "config.toml")
        path = config.get("sample_prompts")
        return read_prompts(path) if path else []
    except (ConfigError, OSError):
        return []


def sample_steps(folder: Path) -> list[int]:
    found = []
    for path in (folder / "samples").glob("step-*.png"):
        digits = path.stem.removeprefix("step-")
        if digits.isdigit():
            found.append(int(digits))
    return sorted(found)


def sample_cell(sheet_path: Path, index: int, count: int) -> bytes:
    """Prompt `index`'s image of a sample sheet: the sheet holds `count` images, four to a row."""
    from PIL import Image

    from ..images import png_bytes

    columns = min(4, count)
    rows = math.ceil(count / columns)
    with Image.open(sheet_path) as sheet:
        width, height = sheet.width // columns, sheet.height // rows
        left, top = (index % columns) * width, (index // columns) * height
        return png_bytes(sheet.crop((left, top, left + width, top + height)))


def grid_job(folder: Path, checkpoint: str) -> Job:
    return Job(folder / "grids" / f"{checkpoint}.png", folder / "logs" / f"grid-{checkpoint}.log")


def toy_job(folder: Path) -> Job:
    return Job(folder / "toy" / "scores.md", folder / "logs" / "toy-scores.log")


def is_toy_run(folder: Path) -> bool:
    try:
        model = str(facts.read_toml(folder / "config.toml").get("model", ""))
    except ConfigError:
        return False
    return is_toy_model(model)


# ---------------------------------------------------------------- requests and answers


def json_error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


async def body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > security.MAX_BODY:
        raise HTTPException(413, f"request body over {security.MAX_BODY} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > security.MAX_BODY:
            raise HTTPException(413, f"request body over {security.MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request) -> dict:
    raw = await body(request)
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        raise HTTPException(400, "the body is not JSON") from None
    if not isinstance(value, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return value


def guard(studio: Studio):
    """The security rules of security.py, as middleware around every request."""

    class Guard:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            request = Request(scope)
            refusal = self.refusal(request)
            if refusal is not None:
                return await refusal(scope, receive, send)
            if studio.token and request.query_params.get("token"):
                async def send_with_cookie(message):
                    if message["type"] == "http.response.start":
                        cookie = f"{security.TOKEN_COOKIE}={studio.token}; Path=/; HttpOnly; SameSite=Strict"
                        message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie.encode())]
                    await send(message)

                return await self.app(scope, receive, send_with_cookie)
            return await self.app(scope, receive, send)

        def refusal(self, request: Request) -> Response | None:
            host = request.headers.get("host", "")
            if not security.host_allowed(host, studio.host):
                return json_error(403, f"this studio does not answer to host {host!r}")
            changing = request.method not in ("GET", "HEAD", "OPTIONS")
            if studio.token:
                given = (request.headers.get(security.TOKEN_HEADER)
                         or request.headers.get("authorization", "").removeprefix("Bearer ").strip() or None)
                if not changing:
                    given = given or request.query_params.get("token") or request.cookies.get(security.TOKEN_COOKIE)
                if not security.same(given, studio.token):
                    return json_error(401, "a token is needed: open the address the studio printed at start "
                                           "(it ends in ?token=...), or send the X-Sdlora-Token header")
            if changing and not security.same_origin(request.headers.get("origin"), request.headers.get("referer"),
                                                     host) and request.headers.get(security.TOKEN_HEADER) is None:
                return json_error(403, "refused: a request that changes something must come from the studio's own "
                                       "pages (same origin) or carry the X-Sdlora-Token header")
            return None

    return Guard


def handle_errors(handler):
    """User mistakes as one-line JSON errors; anything else stays a bug (a 500 with its traceback logged)."""

    async def wrapped(request: Request):
        try:
            return await handler(request)
        except security.OutsideFolder as error:
            return json_error(403, str(error))
        except datasets.CaptionConflict as error:
            return json_error(409, str(error), current=error.current_text, version=error.current_version)
        except SdloraError as error:
            return json_error(400, str(error))
        except (KeyError, FileNotFoundError) as error:
            return json_error(404, f"not found: {error}")

    return wrapped


# ---------------------------------------------------------------- the app


def create_app(studio: Studio, tick: bool = True) -> Starlette:
    templates = Environment(loader=PackageLoader("sdlora.studio", "templates"),
                            autoescape=select_autoescape(["html"]))

    def page(name: str, **values) -> HTMLResponse:
        # The token goes into pages only for requests that passed the guard, that is, that had it already.
        return HTMLResponse(templates.get_template(name).render(page=name.removesuffix(".html"), token=studio.token,
                                                                **values))

    async def runs_page(request):
        return page("runs.html", state=await run_in_threadpool(studio.states))

    async def run_page(request):
        run = request.path_params["run"]
        return page("run.html", run=await run_in_threadpool(studio.run_state, run))

    async def compare_page(request):
        names = request.query_params.getlist("run")
        runs = [await run_in_threadpool(studio.run_state, name) for name in names]
        return page("compare.html", runs=runs, diff=config_differences(runs),
                    all_runs=[row["name"] for row in studio.states()["runs"]])

    async def new_page(request):
        clone = request.query_params.get("clone")
        values = {}
        if clone:
            values = forms.form_values_of_toml((studio.folder(clone) / "config.toml").read_text())
        groups: dict[str, list[dict]] = {}
        for entry in forms.form_fields():  # in the dataclass's order, as `sdlora train --help` shows them
            groups.setdefault(entry["group"], []).append(entry)
        return page("new.html", groups=list(groups.items()), values=values, clone=clone)

    async def datasets_page(request):
        return page("datasets.html", folders=data_folders(studio))

    async def dataset_page(request):
        root, folder = dataset_folder(studio, request)
        described = await run_in_threadpool(datasets.describe_folder, folder)
        return page("dataset.html", root=request.query_params.get("root", "0"),
                    folder=request.query_params.get("folder", ""), described=described)

    async def adapter_page(request):
        return page("adapter.html", path=request.query_params.get("path", ""), report=adapter_report(studio, request))

    # --- the API

    async def api_runs(request):
        return JSONResponse(await run_in_threadpool(studio.states))

    async def api_queue_run(request):
        if request.headers.get("content-type", "").startswith("application/json"):
            values = await json_body(request)
            form, run = values.get("form", {}), values.get("run")
            if not isinstance(form, dict) or not isinstance(run, (str, type(None))):
                raise HTTPException(400, 'the body is {"form": {KEY: VALUE, ...}, "run": NAME}')
            answer = studio.queue_run("", run, form=form)
        else:
            raw = await body(request)
            answer = studio.queue_run(raw.decode("utf-8", errors="replace"), request.query_params.get("run"))
        return JSONResponse(answer, status_code=400 if "errors" in answer else 201)

    async def api_run(request):
        return JSONResponse(await run_in_threadpool(studio.run_state, request.path_params["run"]))

    async def api_metrics(request):
        folder = studio.folder(request.path_params["run"])
        columns = await run_in_threadpool(studio.metrics.read, folder / "logs" / "metrics.jsonl")
        query = request.query_params
        if "after" in query:
            return JSONResponse(records_after(columns, int(query["after"])))
        first, last = query.get("first"), query.get("last")
        return JSONResponse(chart_series(columns, points=min(4000, int(query.get("points", 1000))),
                                         first=int(first) if first else None, last=int(last) if last else None))

    async def api_control(request):
        run, action = request.path_params["run"], request.path_params["action"]
        if action not in control.ACTIONS:
            raise KeyError(f"action {action!r} (there are {', '.join(control.ACTIONS)})")
        folder = studio.folder(run)
        state = facts.run_facts(folder)
        if state.status != "running":
            raise ConfigError(f"run {run} is {state.status}, not running: nothing to {action}")
        path = control.request(folder, action)
        return JSONResponse({"requested": action, "file": path.name}, status_code=202)

    async def api_resume(request):
        values = await json_body(request)
        return JSONResponse(studio.resume(request.path_params["run"], values.get("checkpoint")), status_code=201)

    async def api_grid(request):
        folder = studio.folder(request.path_params["run"])
        checkpoint = request.path_params["checkpoint"]
        if not (folder / "checkpoints" / checkpoint / ADAPTER_FILE).is_file():
            raise KeyError(f"checkpoint {checkpoint} of {folder.name}")
        job = grid_job(folder, checkpoint)
        if request.method == "POST":
            config = facts.read_toml(folder / "config.toml")
            prompt = (sample_prompts(folder) or ["a picture"])[0]
            job.start(["generate", "--model", str(config["model"]), "--lora",
                       str(folder / "checkpoints" / checkpoint / ADAPTER_FILE), "--prompt", prompt, "--compare",
                       "--num", "2", "--steps", "20", "--output", str(job.result)])
        return JSONResponse(job.state() | {"url": f"/files/runs/{folder.name}/grids/{checkpoint}.png"})

    async def api_toy(request):
        folder = studio.folder(request.path_params["run"])
        job = toy_job(folder)
        if request.method == "POST":
            state = facts.run_facts(folder)
            if not state.adapter or not is_toy_run(folder):
                raise ConfigError(f"run {folder.name} has no finished adapter of the toy model to score")
            config = facts.read_toml(folder / "config.toml")
            job.start(["toy", "eval", "--model", str(config["model"]), "--lora", str(folder / state.adapter),
                       "--grid", str(folder / "toy" / "grid.png")], stdout_is_result=True)
        answer = job.state()
        if answer["state"] == "done":
            answer["scores"] = job.result.read_text()
        return JSONResponse(answer)

    async def api_sample_cell(request):
        folder = studio.folder(request.path_params["run"])
        step, index = int(request.path_params["step"]), int(request.path_params["index"])
        prompts = sample_prompts(folder)
        sheet = folder / "samples" / f"step-{step:06d}.png"
        if not sheet.is_file() or not 0 <= index < max(1, len(prompts)):
            raise KeyError(f"sample {index} of step {step}")
        data = await run_in_threadpool(sample_cell, sheet, index, max(1, len(prompts)))
        return Response(data, media_type="image/png", headers={"cache-control": "max-age=3600"})

    async def api_queue(request):
        return JSONResponse({"queue": [entry.to_json() for entry in studio.queue.entries()]})

    async def api_queue_entry(request):
        entry_id = int(request.path_params["entry"])
        if request.method == "DELETE":
            return JSONResponse(studio.queue.cancel(entry_id).to_json())
        values = await json_body(request)
        moved = studio.queue.move(entry_id, int(values.get("index", 0)))
        return JSONResponse({"queue": [entry.to_json() for entry in moved]})

    async def api_fields(request):
        return JSONResponse({"fields": forms.form_fields()})

    async def api_check(request):
        form = (await json_body(request)).get("form", {})
        if not isinstance(form, dict):
            raise HTTPException(400, 'the body is {"form": {KEY: VALUE, ...}}')
        return JSONResponse(studio.check_form(form))

    async def api_datasets(request):
        return JSONResponse({"folders": data_folders(studio)})

    async def api_dataset(request):
        root, folder = dataset_folder(studio, request)
        return JSONResponse(await run_in_threadpool(datasets.describe_folder, folder))

    async def api_caption(request):
        values = await json_body(request)
        _, folder = dataset_folder(studio, request)
        version = datasets.save_caption(folder, str(values.get("image", "")), str(values.get("text", "")),
                                        str(values.get("version", "")))
        return JSONResponse({"version": version})

    async def api_adapter(request):
        return JSONResponse(adapter_report(studio, request))

    async def api_events(request):
        return StreamingResponse(event_stream(studio, request), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    async def run_file(request):
        path = security.inside(studio.runs, request.path_params["path"])
        if not path.is_file() or STUDIO_FOLDER in path.relative_to(studio.runs.resolve()).parts:
            raise HTTPException(404, "no such file")
        return FileResponse(path)

    async def data_file(request):
        root = data_root(studio, request.path_params["root"])
        path = security.inside(root, request.path_params["path"])
        if not path.is_file():
            raise HTTPException(404, "no such file")
        return FileResponse(path)

    api = [Route("/api/runs", handle_errors(api_runs)),
           Route("/api/runs", handle_errors(api_queue_run), methods=["POST"]),
           Route("/api/runs/{run}", handle_errors(api_run)),
           Route("/api/runs/{run}/metrics", handle_errors(api_metrics)),
           Route("/api/runs/{run}/resume", handle_errors(api_resume), methods=["POST"]),
           Route("/api/runs/{run}/checkpoints/{checkpoint}/grid", handle_errors(api_grid), methods=["GET", "POST"]),
           Route("/api/runs/{run}/toy-scores", handle_errors(api_toy), methods=["GET", "POST"]),
           Route("/api/runs/{run}/samples/{step:int}/{index:int}.png", handle_errors(api_sample_cell)),
           # last of the run's routes: the other names under a run are not actions
           Route("/api/runs/{run}/{action:str}", handle_errors(api_control), methods=["POST"]),
           Route("/api/queue", handle_errors(api_queue)),
           Route("/api/queue/{entry:int}", handle_errors(api_queue_entry), methods=["POST", "DELETE"]),
           Route("/api/config/fields", handle_errors(api_fields)),
           Route("/api/config/check", handle_errors(api_check), methods=["POST"]),
           Route("/api/datasets", handle_errors(api_datasets)),
           Route("/api/dataset", handle_errors(api_dataset)),
           Route("/api/dataset/caption", handle_errors(api_caption), methods=["PUT"]),
           Route("/api/adapter", handle_errors(api_adapter)),
           Route("/api/events", api_events)]
    pages = [Route("/", handle_errors(runs_page)),
             Route("/runs/{run}", handle_errors(run_page)),
             Route("/compare", handle_errors(compare_page)),
             Route("/new", handle_errors(new_page)),
             Route("/datasets", handle_errors(datasets_page)),
             Route("/dataset", handle_errors(dataset_page)),
             Route("/adapter", handle_errors(adapter_page)),
             Route("/files/runs/{path:path}", handle_errors(run_file)),
             Route("/files/data/{root:int}/{path:path}", handle_errors(data_file)),
             Mount("/static", StaticFiles(packages=[("sdlora.studio", "static")]), name="static")]

    @asynccontextmanager
    async def lifespan(app):
        if tick:
            studio.start_ticking()
            lower_priority()  # of this thread, and of the worker threads it makes from now on
        yield
        studio.stop_ticking()

    app = Starlette(routes=api + pages, lifespan=lifespan)
    app.add_middleware(guard(studio))
    return app


# ---------------------------------------------------------------- pieces of pages


def config_differences(runs: list[dict]) -> list[dict]:
    """The config keys whose values differ between the runs, each with every run's value."""
    configs = []
    for run in runs:
        try:
            configs.append(tomllib.loads(run.get("config") or ""))
        except tomllib.TOMLDecodeError:
            configs.append({})
    keys = sorted({key for config in configs for key in config})
    rows = []
    for key in keys:
        values = [config.get(key) for config in configs]
        if key not in ("output_dir", "resume") and any(value != values[0] for value in values):
            rows.append({"key": key, "values": ["(unset)" if value is None else json.dumps(value) for value in values]})
    return rows


def data_root(studio: Studio, index) -> Path:
    index = int(index)
    if not 0 <= index < len(studio.data):
        raise KeyError(f"data folder number {index}")
    return studio.data[index]


def dataset_folder(studio: Studio, request: Request) -> tuple[Path, Path]:
    root = data_root(studio, request.query_params.get("root", "0"))
    folder = request.query_params.get("folder", "")
    return root, security.inside(root, folder) if folder else root.resolve()


def data_folders(studio: Studio) -> list[dict]:
    """The image folders under each data root (the root itself and its subfolders holding images)."""
    from ..training.data import IMAGE_EXTENSIONS, MASK_SUFFIX

    found = []
    for index, root in enumerate(studio.data):
        if not root.is_dir():
            continue
        for folder in [root, *sorted(path for path in root.iterdir() if path.is_dir())]:
            walk = folder.rglob("*") if folder != root else folder.iterdir()
            count = sum(1 for path in walk if path.suffix.lower() in IMAGE_EXTENSIONS
                        and not path.name.endswith(MASK_SUFFIX))
            if count:
                found.append({"root": index, "folder": "" if folder == root else folder.name,
                              "name": f"{root.name}/{folder.name}" if folder != root else root.name, "images": count})
    return found


def adapter_report(studio: Studio, request: Request) -> dict:
    """What `sdlora inspect` says about a .safetensors inside the runs folder (or a data folder)."""
    from ..tools import inspect as inspection

    relative = request.query_params.get("path", "")
    if not relative:
        return {"files": adapter_files(studio)}
    path = security.inside(studio.runs, relative)
    if path.suffix != ".safetensors" or not path.is_file():
        raise KeyError(f"adapter {relative}")
    report = inspection.inspect(path)
    return {"path": relative, "text": inspection.render(report), "report": json.loads(inspection.to_json(report))}


def adapter_files(studio: Studio) -> list[str]:
    root = studio.runs.resolve()
    return sorted(str(path.relative_to(root)) for path in root.rglob("*.safetensors")
                  if STUDIO_FOLDER not in path.relative_to(root).parts)


async def event_stream(studio: Studio, request: Request):
    """Server-sent events: `runs` (every run's state) when it changes, and `metrics` (the points after the
    last one sent) for each run named by `?run=`, from `?after=STEP` on."""
    watched = request.query_params.getlist("run")
    after = {run: int(request.query_params.get("after", -1)) for run in watched}
    last_runs, quiet_since = None, time.monotonic()
    yield "retry: 1000\n\n"
    while not await request.is_disconnected():
        states = await run_in_threadpool(studio.states)
        text = json.dumps(states)
        if text != last_runs:
            last_runs, quiet_since = text, time.monotonic()
            yield f"event: runs\ndata: {text}\n\n"
        for run in watched:
            folder = studio.runs / run
            columns = await run_in_threadpool(studio.metrics.read, folder / "logs" / "metrics.jsonl")
            if columns.last_step > after[run]:
                data = records_after(columns, after[run]) | {"run": run}
                after[run] = columns.last_step
                quiet_since = time.monotonic()
                yield f"event: metrics\ndata: {json.dumps(data)}\n\n"
        if time.monotonic() - quiet_since > 15:
            quiet_since = time.monotonic()
            yield ": still here\n\n"  # proxies close a silent stream
        await asyncio.sleep(POLL_S)


def lower_priority() -> None:
    """On Linux niceness is a thread's own: lower this one's (threads it starts inherit it), not the process's."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
        except OSError:  # a sandbox that forbids it: the studio runs at the normal priority
            pass


def serve(runs: Path, data: list[Path], host: str = "127.0.0.1", port: int = 7860, token: str | None = None,
          parallel: int = 1) -> None:
    import uvicorn

    if not security.loopback(host) and token is None:
        token = security.new_token()
    studio = Studio(runs=runs, data=data, host=host, token=token, parallel=parallel)
    address = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    print(f"sdlora studio: {address}" + (f"?token={token}" if token else "") + f"  (runs: {runs})", flush=True)
    uvicorn.run(create_app(studio), host=host, port=port, log_level="warning")
