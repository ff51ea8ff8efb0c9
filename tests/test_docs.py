"""The README and the docs site: the site builds strictly, every relative link resolves, and every
command they show is run by a test (or says why not).

Each fenced ``bash``/``python`` block of README.md and docs/*.md carries a marker on the line before
its fence (docs/contributing.md lists them):

- ``<!-- runnable -->``: run with ``bash -e`` from the repo root, the venv first on PATH;
- ``<!-- runnable: python -->``: run with this Python from the repo root;
- ``<!-- runnable: server -->``: run against the session TorchServe (its ports replace 8080-8082);
- ``<!-- runnable: peer -->``: as ``runnable``, in ``make test-peer`` only (the model builds of own_models.md);
- ``<!-- dry-run -->``: every ``make`` line runs as ``make -n`` (targets and variables exist);
- ``<!-- not-run: reason -->``: syntax-checked only.

Blocks included into the site from deploy/README.md carry no markers; they are syntax-checked.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.browser import headless_chromium, require_chromium

pytestmark = pytest.mark.serves("efficientnet_lite0")  # the model the `runnable: server` blocks call
REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))
SOURCES = [README, *PAGES]
INCLUDED = [REPO / "deploy" / "README.md"]  # pulled into docs/deployment.md by pymdownx.snippets
README_MAX_LINES = 250
COMMAND_LANGUAGES = {"bash", "sh", "shell", "console", "python"}
MARKER = re.compile(r"^<!--\s*(runnable(?::\s*(?:python|server|peer))?|dry-run|not-run:\s*\S.*?)\s*-->$")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+)(?P<lang>[\w+-]*)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
BIN = Path(sys.executable).parent


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None

    @property
    def kind(self) -> str:
        if self.marker is None:
            return "unmarked"
        return (
            self.marker.split(":", 1)[0]
            if self.marker.startswith("not-run")
            else self.marker.replace(" ", "")
        )

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced code block of ``path`` with the marker comment on the line before it (if any)."""
    lines = path.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, fence = match["indent"], match["fence"]
        end = index + 1
        while end < len(lines) and not lines[end].startswith(indent + fence):
            end += 1
        body = [
            line[len(indent) :] if line.startswith(indent) else line.lstrip()
            for line in lines[index + 1 : end]
        ]
        previous = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = MARKER.match(previous)
        blocks.append(Block(path, index + 1, match["lang"].lower(), "\n".join(body) + "\n",
                            marker.group(1) if marker else None))  # fmt: skip
        index = end + 1
    return blocks


def command_blocks(paths: list[Path]) -> list[Block]:
    return [block for path in paths for block in fenced_blocks(path) if block.lang in COMMAND_LANGUAGES]


BLOCKS = command_blocks(SOURCES)


def blocks_of(kind: str) -> list[Block]:
    return [block for block in BLOCKS if block.kind == kind]


def environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["NO_MKDOCS_2_WARNING"] = "1"
    env.update(extra)
    return env


def run_bash(code: str, cwd: Path, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=cwd, env=environment(**extra),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


# ---- the site ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """`make docs`'s strict build, once for the tests of the site."""
    site = tmp_path_factory.mktemp("docs") / "site"
    completed = subprocess.run(
        [str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(site)],
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    return site, completed


def test_site_builds_strictly_without_a_warning(built_site: tuple[Path, subprocess.CompletedProcess]) -> None:
    site, completed = built_site
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "WARNING" not in output, output
    # every page is in the nav and was built; the API reference was generated from the docstrings
    for page in PAGES:
        built = site / f"{page.stem}.html"
        assert built.is_file(), f"{page.name} was not built"
    api = (site / "api.html").read_text()
    for anchor in (
        "cam_engine.create",
        "cam_engine.BaseCAM.run",
        "cam_engine.targets.ClassifierOutputTarget",
    ):
        assert f'id="{anchor}"' in api, f"the API reference lacks {anchor}"
    # the deployment page includes deploy/README.md (one source for both)
    deployment = (site / "deployment.html").read_text()
    assert "Token authorization: probes and clients" in deployment


# ---- the README ----------------------------------------------------------------------------------------


def test_readme_is_a_landing_page() -> None:
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    # the first commands are the two set-up commands, the next one activates the venv
    first, second = command_blocks([README])[:2]
    assert re.findall(r"^make (\w+)", first.code, re.M) == ["serve", "test"], first.code
    assert second.code.strip() == "source .venv/bin/activate", second.code


def slug(heading: str) -> str:
    """Python-Markdown's toc slug (also GitHub's for plain headings): the anchor of a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    text = path.read_text()
    for include in re.findall(r'^--8<-- "([^":]+)', text, re.M):
        text += "\n" + (REPO / include).read_text()
    fenced = re.sub(r"^ *```.*?^ *```", "", text, flags=re.M | re.S)
    return {slug(match) for match in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", fenced, re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"^ *```.*?^ *```", "", path.read_text(), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [match["target"] for match in LINK.finditer(text)]


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_resolves(path: Path) -> None:
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target} (no {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"{path.name}: " + "; ".join(broken)
    if path == README:
        assert any(target.startswith("docs/") for target in links(path)), "the README links into the docs"


def test_no_inline_base64_on_a_command_line() -> None:
    """Stumble 3: `$(base64 photo)` inside curl's arguments fails on any photo over ~96 KB."""
    offenders = [
        str(block)
        for block in BLOCKS + command_blocks(INCLUDED)
        if re.search(r"\$\(\s*base64|'\$B64'|\"\$B64\"", block.code)
    ]
    assert not offenders, offenders


def test_every_raw_bytes_example_names_its_content_type() -> None:
    missing = []
    for block in BLOCKS + command_blocks(INCLUDED):
        for command in re.split(r"(?<!\\)\n", block.code):
            if re.search(r"\bcurl\b", command) and re.search(r"\s(-T|--data-binary)\s", command):
                if "Content-Type" not in command:
                    missing.append(f"{block}: {command.strip()[:80]}")
    assert not missing, missing


# ---- every command is run (or says why not) -------------------------------------------------------------


def test_every_command_block_is_marked() -> None:
    unmarked = [str(block) for block in blocks_of("unmarked")]
    assert not unmarked, f"fenced command blocks without a marker (see docs/contributing.md): {unmarked}"
    assert blocks_of("runnable") and blocks_of("runnable:python") and blocks_of("runnable:server")


@pytest.mark.parametrize("block", BLOCKS + command_blocks(INCLUDED), ids=str)
def test_every_command_block_parses(block: Block) -> None:
    if block.lang == "python":
        compile(block.code, str(block), "exec")
    else:
        completed = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
        assert completed.returncode == 0, f"{block}: {completed.stderr}"


@pytest.mark.parametrize(
    "block",
    [*blocks_of("runnable"), *(pytest.param(b, marks=pytest.mark.peer) for b in blocks_of("runnable:peer"))],
    ids=str,
)
def test_runnable_commands_run(block: Block) -> None:
    completed = run_bash(block.code, REPO)
    assert completed.returncode == 0, (
        f"{block}\n{block.code}\n{completed.stdout[-2000:]}\n{completed.stderr[-2000:]}"
    )


PYTHON_RUNNER = """
import sys, traceback
failed = []
for name, code in BLOCKS:
    try:
        exec(compile(code, name, "exec"), {"__name__": "__main__"})
    except BaseException:
        failed.append(name + "\\n" + traceback.format_exc())
print("\\n\\n".join(failed), file=sys.stderr)
sys.exit(1 if failed else 0)
"""


def test_runnable_python_runs() -> None:
    """Every `runnable: python` block, each in a fresh namespace, in one interpreter (torch loads once)."""
    blocks = blocks_of("runnable:python")
    assert blocks
    program = f"BLOCKS = {[(str(block), block.code) for block in blocks]!r}\n" + PYTHON_RUNNER
    completed = subprocess.run([sys.executable, "-c", program], cwd=REPO, env=environment(),
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]


def dry_run(code: str) -> str:
    """Every ``make`` command of ``code`` as ``make -n`` (prints the recipes, runs none)."""
    return re.sub(r"(^|[\s;&|])make(?=\s)", r"\1make -n", code, flags=re.M)


@pytest.mark.parametrize("block", blocks_of("dry-run"), ids=str)
def test_make_commands_name_real_targets_and_variables(block: Block) -> None:
    code = dry_run(block.code)
    assert "make -n" in code, f"{block}: a dry-run block without a make command"
    completed = run_bash(code, REPO, timeout=60)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, f"{block}\n{code}\n{output[-2000:]}"
    assert "No rule to make target" not in output, output


def test_every_make_variable_shown_is_read() -> None:
    """`VAR=value make ...` and `make ... VAR=value`: make ignores a variable nobody reads, so check them."""
    readers = [REPO / "Makefile", REPO / "model_store" / "serve.py", *(REPO / "load_tests").glob("*.py")]
    text = "\n".join(path.read_text() for path in readers)
    shown = set()
    for block in BLOCKS:
        for line in re.sub(r"\\\n\s*", " ", block.code).splitlines():
            if re.search(r"(^|\s)make\s", line):
                shown |= set(re.findall(r"(?:^|\s)([A-Z][A-Z0-9_]*)=", line.split("#", 1)[0]))
    assert {"MODELS", "ALLOW_RANDOM_WEIGHTS", "RESTART", "INFERENCE_PORT"} <= shown
    unread = sorted(
        name for name in shown if name != "OMP_NUM_THREADS" and not re.search(rf"\b{name}\b", text)
    )
    assert not unread, f"variables shown with make that neither the Makefile nor the scripts read: {unread}"


def test_serve_with_random_weights_builds_with_the_flag() -> None:
    """`make serve MODELS=... ALLOW_RANDOM_WEIGHTS=1` (README) passes --allow-random-weights to the build."""
    completed = run_bash("make -n -B serve MODELS=resnet50 ALLOW_RANDOM_WEIGHTS=1", REPO, timeout=60)
    assert completed.returncode == 0, completed.stderr
    build = [line for line in completed.stdout.splitlines() if "model_store.build resnet50" in line]
    assert build and "--allow-random-weights" in build[0], completed.stdout
    serve = [line for line in completed.stdout.splitlines() if "model_store.serve start" in line]
    assert serve and "--model resnet50" in serve[0], completed.stdout


def json_documents(text: str) -> list[object]:
    """The JSON objects printed one after another in ``text`` (curl's answers)."""
    decoder, documents, position = json.JSONDecoder(), [], 0
    while (start := text.find("{", position)) != -1:
        try:
            document, position = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        documents.append(document)
    return documents


def errors(answer: object) -> list[dict]:
    """The error objects (``{"code", "type", "message"}``) anywhere in an answer (KServe nests them)."""
    if isinstance(answer, dict):
        found = [answer] if {"code", "message"} <= answer.keys() else []
        return found + [error for value in answer.values() for error in errors(value)]
    if isinstance(answer, list):
        return [error for value in answer for error in errors(value)]
    return []


def test_server_commands_work_against_a_real_torchserve(server, tmp_path: Path) -> None:
    """Every `runnable: server` block, as written, against the session TorchServe (real EfficientNet-Lite0).

    Its ports replace 8080-8082, its key_file.json lies in the working directory with docs/ beside it."""
    blocks = blocks_of("runnable:server")
    assert blocks
    shutil.copy(Path(server.workdir) / "key_file.json", tmp_path / "key_file.json")
    (tmp_path / "docs").symlink_to(REPO / "docs")
    defaults = {"inference": 8080, "management": 8081, "metrics": 8082}
    for block in blocks:
        code = block.code
        for api, port in defaults.items():
            code = code.replace(f"127.0.0.1:{port}", f"127.0.0.1:{server.ports[api]}")
        completed = run_bash(code, tmp_path, timeout=300, TOKEN=server.keys["inference"],
                             TORCHSERVE_CAM_URL=server.url())  # fmt: skip
        context = f"{block}\n{code}\n{completed.stdout[-2000:]}\n{completed.stderr[-2000:]}"
        assert completed.returncode == 0, context
        answers = json_documents(completed.stdout)
        if "curl" in code:
            assert answers, context
        for answer in answers:
            assert isinstance(answer, dict) and not errors(answer), context
            results = answer.get("explanations") or answer.get("predictions")
            assert results, context
            if "explanations" in answer and isinstance(answer["explanations"][0], dict) and \
                    "heatmap" in answer["explanations"][0]:  # fmt: skip
                heatmap = answer["explanations"][0]["heatmap"]
                assert (heatmap["width"], heatmap["height"]) == (451, 300), context  # docs/chelsea.jpg's size
        if "torchserve-cam" in code:
            assert "Egyptian cat" in completed.stdout, context


# ---- commands written in prose (inline code) as well as in blocks ---------------------------------------


def command_lines(prefix: str) -> list[tuple[str, str]]:
    """``(where, command)`` for every command starting with ``prefix``, in inline code or in a command block."""
    found = []
    for path in SOURCES + INCLUDED:
        prose = re.sub(r"^ *```.*?^ *```", "", path.read_text(), flags=re.M | re.S)
        spans = re.findall(r"`([^`\n]+)`", prose)  # a span of two words names a command, it does not run one
        found += [(path.name, span) for span in spans if span.startswith(prefix) and len(span.split()) > 2]
        for block in command_blocks([path]):
            for line in re.sub(r"\\\n\s*", " ", block.code).splitlines():
                for command in re.split(r"\s*(?:&&|;|\|)\s*", line.strip()):
                    command = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", command)  # VAR=value prefixes
                    if command.startswith(prefix):
                        found.append((str(block), command))
    return found


def test_every_cli_command_shown_parses() -> None:
    """`torchserve-cam ...` anywhere in the README and the docs is a command the CLI accepts."""
    import shlex

    from torchserve_cam_cli.main import build_parser

    commands = command_lines("torchserve-cam ")
    assert len(commands) >= 5
    for where, command in commands:
        arguments = shlex.split(command, comments=True)[1:]
        try:
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()) as errors,
            ):
                build_parser().parse_args(arguments)
        except SystemExit as exit_:
            if exit_.code not in (0, None):  # --help exits 0
                pytest.fail(f"{where}: the CLI refuses {command!r}: {errors.getvalue()}")


BUILD_OPTIONS_WITH_VALUES = {"--weights", "--extra-file", "--output"}  # python -m model_store.build --help


def test_every_model_named_in_a_command_has_a_config() -> None:
    """Config names in `python -m model_store.build NAME`, `make ... MODELS=/MODEL=` and `--model` exist
    (a path to a config file, `model_store.build PATH.yaml`, is a user's own config: not a shipped name)."""
    configs = {path.stem for path in (REPO / "model_store" / "configs").glob("*.yaml")}
    named = []
    for where, command in command_lines("torchserve-cam "):
        words = shlex_words(command)
        named += [(where, words[i + 1]) for i, word in enumerate(words[:-1]) if word == "--model"]
    for where, command in command_lines("python -m model_store.build ") + command_lines("make "):
        words = shlex_words(command)
        if words[:3] == ["python", "-m", "model_store.build"]:
            rest, index = words[3:], 0
            while index < len(rest):
                word = rest[index]
                if word in BUILD_OPTIONS_WITH_VALUES:
                    index += 2
                    continue
                if not word.startswith("-"):
                    named.append((where, word))
                index += 1
        for word in words:
            if word.startswith(("MODELS=", "MODEL=")):
                named += [(where, name) for name in word.split("=", 1)[1].split()]
    assert len(named) >= 10
    unknown = [f"{where}: {name}" for where, name in named if name not in configs and not name.endswith((".yaml", ".yml"))]
    assert not unknown, unknown


def shlex_words(command: str) -> list[str]:
    import shlex

    try:
        return shlex.split(command, comments=True)
    except ValueError:
        return command.split()


def test_site_opened_from_disk_navigates_renders_references_and_scrolls_wide_tables(
    built_site: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    """`make docs`, then site/index.html opened as a file, as the README says: a navigation link leads to
    a page (not a directory listing), the API page's cross-references are links, no page shows a raw
    Sphinx role, and the performance page's widest table can be scrolled to its last column."""
    require_chromium()
    site, completed = built_site
    assert completed.returncode == 0, completed.stderr
    for page in site.glob("*.html"):
        roles = re.findall(r":(?:meth|func|class|mod|attr|data|exc):`", page.read_text())
        assert not roles, f"{page.name} shows raw Sphinx roles: {roles[:3]}"
    shots = Path(os.environ.get("DOCS_SCREENSHOTS", tmp_path))
    with headless_chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto((site / "index.html").as_uri())
        page.screenshot(path=str(shots / "docs_index.png"))
        page.locator("nav.md-nav--primary a.md-nav__link", has_text="Performance").first.click()
        page.wait_for_load_state()
        assert page.url.endswith("/performance.html"), page.url
        assert page.locator("h1").first.inner_text().strip(), "the navigation link led to no page"
        assert "Index of" not in page.title()
        widest = page.eval_on_selector_all(
            "article table",
            """tables => tables.map(t => {
                const wrap = t.closest('.md-typeset__scrollwrap') || t.parentElement;
                const last = t.querySelector('tr').lastElementChild;
                wrap.scrollLeft = wrap.scrollWidth;
                const right = last.getBoundingClientRect().right;
                return [t.scrollWidth, right <= window.innerWidth + 1];
            }).sort((a, b) => b[0] - a[0])[0]""",
        )  # fmt: skip
        assert widest[1], f"the widest table ({widest[0]} px) cannot be scrolled to its last column"
        page.screenshot(path=str(shots / "docs_performance.png"))
        page.goto((site / "api.html").as_uri())
        links = page.locator("article a.autorefs-internal")
        assert links.count() >= 20, "the API reference's cross-references are not links"
        href = links.first.get_attribute("href")
        assert href and href.startswith("#"), href
        page.screenshot(path=str(shots / "docs_api.png"))


def test_make_docs_installs_only_the_docs_extra_and_changes_no_installed_package() -> None:
    """`make docs` installs the docs extra alone; pip's resolution of it in this venv (a dry run) must not
    upgrade, downgrade or replace any package already installed: the running server's packages stay."""
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^docs: \$\(VENV\)/\.installed-extra-docs$", makefile, re.M), "make docs must need the docs extra only"
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", "--no-build-isolation",
         "-e", f"{REPO}[docs]"],
        capture_output=True, text=True, timeout=300, env=environment(),
    )  # fmt: skip
    if completed.returncode != 0 and "No matching distribution" in completed.stderr:
        pytest.skip(f"no package registry here: {completed.stderr[-300:]}")
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads(completed.stdout)
    changed = []
    for item in report.get("install", []):
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if name.lower().replace("_", "-") == "torchserve-cam":
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a new package only the docs need
        if installed != version:
            changed.append(f"{name} {installed} -> {version}")
    assert not changed, f"make docs would change packages the server uses: {changed}"
