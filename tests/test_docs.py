"""The docs stay honest: every link and path they name exists, every command they show parses with the
real command line, every Python example imports what exists, every TOML example is a valid config, and
docs/reliability.md names a test that exists for every fault."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NAMED_TEST = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# A path inside this repository, written in backticks: `sdlora/adapters/lora.py`, `tests/x.py::name`,
# `tests/test_loader.py:253`. Placeholders (`OUT/<name>...`) start elsewhere and are not paths.
REPO_PATH = re.compile(r"`((?:sdlora|tests|docs|bench|datasets|models|notebooks|\.ci)/[^`\s:]*)(?:::(\w+)|:\d+)?`")
DOTTED = re.compile(r"`(sdlora(?:\.\w+)+)(?:\(\))?`")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def code_blocks(languages: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(page_id(page), body) for page in PAGES for language, body in FENCE.findall(page.read_text())
            if language in languages]


def shell_lines(body: str) -> list[str]:
    """A bash block's commands, continuation lines joined, comments kept for shlex to drop."""
    return [line for line in body.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to dashes."""
    anchors = set()
    for line in prose(page.read_text()).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


def resolve(dotted: str):
    """`sdlora.a.b.c` as the module or attribute it names, importing submodules on the way."""
    parts = dotted.split(".")
    value = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        try:
            value = getattr(value, part)
        except AttributeError:
            value = importlib.import_module(".".join(parts[: i + 1]))
    return value


def test_every_row_of_the_reliability_table_names_tests_that_exist():
    rows = [line for line in (ROOT / "docs" / "reliability.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| fault", "|---"))]
    assert len(rows) >= 25
    for row in rows:
        named = NAMED_TEST.findall(row)
        assert named, f"a row names no test: {row[:80]}"
        for module, name in named:
            tree = ast.parse((ROOT / module).read_text())
            functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
            assert name in functions, f"{module}::{name} named in docs/reliability.md does not exist"


def test_every_relative_link_resolves():
    checked = 0
    for page in PAGES:
        for target in LINK.findall(prose(page.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page_id(page)} links to {target}, which does not exist"
            if anchor:
                assert linked.suffix == ".md" and anchor in heading_anchors(linked), \
                    f"{page_id(page)} links to {target}: no such heading in {linked.name}"
            checked += 1
    assert checked >= 20  # the README's table of pages alone has more


def test_every_docs_page_is_linked_from_the_readme():
    readme = ROOT / "README.md"
    linked = {(readme.parent / target.partition("#")[0]).resolve() for target in LINK.findall(readme.read_text())}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"{page_id(page)} is not linked from README.md"


def test_every_repository_path_named_exists():
    checked = 0
    for page in PAGES:
        for path, test_name in REPO_PATH.findall(page.read_text()):
            assert (ROOT / path).exists(), f"{page_id(page)} names {path}, which does not exist"
            if test_name:
                tree = ast.parse((ROOT / path).read_text())
                functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
                assert test_name in functions, f"{page_id(page)} names {path}::{test_name}, which does not exist"
            checked += 1
    assert checked >= 50


def test_every_python_name_of_sdlora_named_exists():
    names = {(page_id(page), dotted) for page in PAGES for dotted in DOTTED.findall(page.read_text())}
    assert len(names) >= 5
    for page, dotted in sorted(names):
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as error:
            pytest.fail(f"{page} names {dotted}: {error}")


def shown_commands() -> list[tuple[str, str]]:
    """Every command line in a bash block (continuation lines joined), and every indented one."""
    commands = [(page, line) for page, body in code_blocks(("bash", "sh")) for line in shell_lines(body)]
    for page in PAGES:
        commands += [(page_id(page), line.strip()) for line in prose(page.read_text()).splitlines()
                     if line.startswith("    sdlora ")]
    return commands


def sdlora_arguments(line: str) -> list[str] | None:
    """The arguments given to `sdlora` in a shell line (`sdlora …`, `python -m sdlora …`,
    `accelerate launch … -m sdlora …`), up to a pipe, a redirection or the next command."""
    words = shlex.split(line, comments=True)
    if "sdlora" not in words:
        return None
    after = words[words.index("sdlora") + 1:]
    ends = [i for i, word in enumerate(after) if word in ("|", "||", "&&", ";", ">", ">>")]
    return after[: ends[0]] if ends else after


def subcommand_parser(parser, words: list[str]):
    """The parser of the (sub)command that `words` name (`train`, `toy eval`), and the words after it."""
    while words:
        choices = next((action.choices for action in parser._actions if isinstance(action.choices, dict)), None)
        if not choices or words[0] not in choices:
            break
        parser, words = choices[words[0]], words[1:]
    return parser, words


def test_every_sdlora_command_shown_parses_with_the_real_command_line(capsys):
    from sdlora.cli import build_parser

    parsed = 0
    for page, line in shown_commands():
        arguments = sdlora_arguments(line)
        if arguments is None:
            continue
        try:
            build_parser().parse_args(arguments)
        except SystemExit as exit:
            if exit.code != 0:  # --help exits 0
                pytest.fail(f"{page}: `{line.strip()}` does not parse: {capsys.readouterr().err.strip()}")
        parsed += 1
    assert parsed >= 20


def test_every_option_of_an_sdlora_command_named_in_prose_exists():
    # Prose abbreviates (`sdlora train --config …`, `sdlora toy eval --config`), so each option it
    # names must exist for that command, rather than the whole line parse.
    from sdlora.cli import build_parser

    named = 0
    for page in PAGES:
        for code in INLINE.findall(prose(page.read_text())):
            if not code.startswith("sdlora "):
                continue
            parser, words = subcommand_parser(build_parser(), code.split()[1:])
            known = {option for action in parser._actions for option in action.option_strings}
            for word in words:
                if word.startswith("-"):
                    assert word.split("=")[0] in known, f"{page_id(page)}: `{code}`: {word} is not an option"
                    named += 1
    assert named >= 5


def test_every_make_target_and_script_shown_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    shown = 0
    for page, line in shown_commands():
        words = shlex.split(line, comments=True)
        if words[:1] == ["make"]:
            assert words[1] in targets, f"{page}: `make {words[1]}` is not a Makefile target"
            shown += 1
        for word in words:
            if re.fullmatch(r"(bench|\.ci|notebooks)/[\w./-]+", word):
                assert (ROOT / word).exists(), f"{page}: {word} does not exist"
    assert shown >= 2  # make demo, make test


def test_every_python_example_compiles_and_imports_what_exists():
    blocks = code_blocks(("python",))
    assert len(blocks) >= 3
    for page, body in blocks:
        tree = ast.parse(body)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "sdlora":
                for alias in node.names:
                    try:
                        resolve(f"{node.module}.{alias.name}")
                    except (ImportError, AttributeError) as error:
                        pytest.fail(f"{page}: from {node.module} import {alias.name}: {error}")
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "sdlora":
                assert hasattr(resolve("sdlora"), node.attr), f"{page}: sdlora.{node.attr} does not exist"


def test_every_toml_example_is_a_valid_training_config(tmp_path):
    from sdlora.training.config import read_toml

    blocks = code_blocks(("toml",))
    assert blocks
    for i, (page, body) in enumerate(blocks):
        path = tmp_path / f"{i}.toml"
        path.write_text(body)
        read_toml(path)  # unknown keys and wrong types raise ConfigError, naming the key


def test_the_readme_shows_the_test_command_ci_runs():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert ci, ".ci/run runs no pytest"
    assert f"the test command is `{ci[-1].strip()}`" in (ROOT / "README.md").read_text()


def test_the_architecture_page_names_every_module_under_its_package():
    # docs/architecture.md is the map a newcomer reads: a module added or moved shows up here first.
    text = (ROOT / "docs" / "architecture.md").read_text()
    bullets = re.split(r"\n- ", text.split("## Every module", 1)[1])
    by_package = {}
    for bullet in bullets:
        opening = re.match(r"`(\w+)/`:|The top level:", bullet)
        if opening:
            by_package[opening.group(1) or ""] = bullet
    package = ROOT / "sdlora"
    for module in sorted(package.rglob("*.py")):
        relative = module.relative_to(package)
        if module.name == "__init__.py" and relative.parent != Path("."):
            continue  # a subpackage's own docstring, named by the package itself
        folder = "" if relative.parent == Path(".") else relative.parts[0]
        assert folder in by_package, f"docs/architecture.md has no bullet for sdlora/{folder}/"
        assert f"`{module.name}`" in by_package[folder], \
            f"docs/architecture.md does not name sdlora/{relative} in its bullet for sdlora/{folder}"
        assert f"  {folder}/" in text or not folder, f"docs/architecture.md's tree lacks sdlora/{folder}/"
