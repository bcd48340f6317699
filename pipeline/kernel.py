"""Stage `kernel`: the same pipeline as a Kaggle notebook, and its life on Kaggle.

    python -m pipeline.kernel [generate] [--id OWNER/SLUG] [--out build/kernel] [--preset P] [--epochs N]
                              [--max-time 10h] [--device auto|cpu|gpu] [--seed S] [--gpu] [--continue]
    python -m pipeline.kernel push   [--folder DIR] [--poll-interval 30] [--max-polls 1500]
    python -m pipeline.kernel status [--folder DIR]
    python -m pipeline.kernel output [--folder DIR] [--out submissions/kernel]

What is written by hand lives in kernels/digit-recognizer/: the notebook's cells (digit-recognizer.md, a
MyST-style Markdown file whose ```{code-cell} blocks are the code cells) and the metadata defaults.
generate builds from them, into build/kernel/ (ignored by git), kernel-metadata.json and the notebook
digit-recognizer.ipynb: the settings cell gets --preset, --epochs, --max-time, --device and --seed (the
template's values otherwise), and the cell tagged `bundle` becomes a hidden cell that writes the pipeline
modules the notebook imports (found by following the imports from ENTRY_MODULES) and the presets to
working/pipeline-src. --gpu asks Kaggle for a T4 (machine_shape), the default is a CPU session;
--continue attaches the kernel's own previous output (kernel_sources), which the notebook continues from.
The kernel id is --id, else KAGGLE_KERNEL_ID, else the username of the Kaggle credentials with the slug
digit-recognizer-numpy-cnn, else the id of the previous build.

push uploads the build (SaveKernel), then asks the run's status every --poll-interval seconds until it is
complete or failed, at most --max-polls times (exit 3 when still running); it refuses a build whose bundled
sources are older than pipeline/ (the other cells are the user's to edit). output downloads the run's
submission.csv, checks it and moves it into submissions/kernel/ with the run's log.
"""
import argparse
import ast
import base64
import dataclasses
import hashlib
import json
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

from pipeline import console, kaggle_api, kaggle_env, paths
from pipeline.errors import StageArgumentParser, UserError, cli_main
from pipeline.fileio import json_loads, write_bytes, write_text

TEMPLATE_DIR = paths.REPO / "kernels" / "digit-recognizer"
TEMPLATE = TEMPLATE_DIR / "digit-recognizer.md"
METADATA_DEFAULTS = TEMPLATE_DIR / "kernel-metadata.defaults.json"
BUILD_DIR = paths.REPO / "build" / "kernel"
NOTEBOOK = "digit-recognizer.ipynb"
METADATA = "kernel-metadata.json"
DEFAULT_SLUG = "digit-recognizer-numpy-cnn"
DEFAULT_TITLE = "Digit Recognizer NumPy CNN"   # Kaggle derives the slug from the title: they must agree
# Kaggle's name for a session with one T4 (kagglesdk's ApiSaveKernelRequest.machine_shape; its other
# options are NvidiaTeslaP100, being retired, and Tpu1VmV38). enable_gpu alone gets a P100 on a CLI push.
GPU_MACHINE_SHAPE = "NvidiaTeslaT4"
# The settings cell's variables, in the order of kaggle_env.settings()'s arguments.
SETTINGS = ("PRESET", "EPOCHS", "MAX_TIME", "DEVICE", "SEED")
RUN_NAMING = ("PRESET", "EPOCHS", "SEED")  # those of SETTINGS that name the run (kaggle_env.Settings.run)
COMPETITION_TEST_ROWS = 28000  # Kaggle's test.csv: the rows a kernel's submission.csv answers
SOURCE_LIMIT = 1_000_000  # Kaggle refuses a kernel source over 1 MB
# The modules the notebook's cells import; the bundle is these plus everything they import from pipeline.
ENTRY_MODULES = ("pipeline.console", "pipeline.kaggle_env", "pipeline.prepare", "pipeline.train",
                 "pipeline.predict", "pipeline.submit", "pipeline.report")
SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
PENDING = {"queued", "running", "new_script"}
POLL_INTERVAL = 30.0
MAX_POLLS = 1500        # 30 s x 1500 = 12.5 hours, past Kaggle's 12-hour session limit


# ---------------------------------------------------------------- the bundle

def _module_file(name):
    """pipeline/x.py or pipeline/x/__init__.py of module `name`, or None when it is not ours."""
    base = paths.REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(name, path):
    """Names of the pipeline modules that the module `name` (file `path`) imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..nn import y
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in found if n == "pipeline" or n.startswith("pipeline.")}


def bundle_files():
    """{repo-relative path: text} of every module the notebook needs, their packages, and configs/*.toml."""
    todo, seen = list(ENTRY_MODULES), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            continue
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # the packages it lives in
        todo.extend(_imports(name, path))
    files = [_module_file(n) for n in seen if _module_file(n) is not None]
    files += sorted(paths.configs().glob("*.toml"))
    return {p.relative_to(paths.REPO).as_posix(): p.read_text(encoding="utf-8") for p in sorted(set(files))}


def _literal(text):
    """Python source for the string `text`: a raw triple-quoted literal people can read, base64 where it cannot be."""
    if "'''" not in text and not text.endswith(("\\", "'")) and "\r" not in text:
        return "r'''" + text + "'''"
    return f"base64.b64decode({base64.b64encode(text.encode()).decode()!r}).decode()"


def bundle_cell(files):
    """The bundle cell (the second code cell, after the settings): write the bundle to working/pipeline-src and
    import pipeline from there."""
    entries = "".join(f"    {name!r}: {_literal(text)},\n" for name, text in files.items())
    return f'''# Our pipeline package, written to disk by this cell: the repository's pipeline/ and configs/, bundled by
# `make kernel`. The settings are in the first code cell; the code is changed in the repository, not here.
import base64
import importlib
import os
import sys
from pathlib import Path

SOURCES = {{
{entries}}}

if sys.version_info < (3, 11):  # tomllib; Kaggle's current environment has it
    raise RuntimeError(f"this notebook needs Python 3.11 or newer, the session has {{sys.version.split()[0]}}: "
                       f"choose the latest environment in the notebook's settings")
sys.dont_write_bytecode = True  # no __pycache__ folders in the saved output
SRC = Path(os.environ.get("KAGGLE_ROOT", "/kaggle")) / "working" / "pipeline-src"
for name, text in SOURCES.items():
    (SRC / name).parent.mkdir(parents=True, exist_ok=True)
    (SRC / name).write_text(text, encoding="utf-8")
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
for module in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
    del sys.modules[module]  # a re-run of this cell imports the code it has just written
importlib.invalidate_caches()
import pipeline

print(f"{{len(SOURCES)}} files written to {{SRC}}; pipeline imported from {{Path(pipeline.__file__).parent}}")'''


# ---------------------------------------------------------------- the notebook

CODE_FENCE = re.compile(r"^```\{code-cell\}\s*ipython3\s*$")
TAGS_LINE = re.compile(r"^:tags:\s*\[(.*)\]\s*$")


def read_template(path=TEMPLATE):
    """[(kind, source, tags)] of the template: the prose between code cells is a markdown cell each,
    a ```{code-cell} ipython3 block a code cell, its leading `:tags: [a, b]` line its tags."""
    cells, lines, tags, kind = [], [], [], "markdown"

    def close():
        source = "\n".join(lines).strip("\n")
        if kind == "code" or source.strip():
            cells.append((kind, source, tuple(tags)))
        lines.clear()
        tags.clear()

    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if kind == "markdown" and CODE_FENCE.match(line):
            close()
            kind = "code"
        elif kind == "code" and line.rstrip() == "```":
            close()
            kind = "markdown"
        elif kind == "code" and not lines and TAGS_LINE.match(line):
            tags.extend(t.strip() for t in TAGS_LINE.match(line).group(1).split(",") if t.strip())
        elif kind == "markdown" and line.startswith("```{"):
            raise UserError(f"{path} line {number}: only ```{{code-cell}} ipython3 blocks are cells")
        else:
            lines.append(line)
    if kind == "code":
        raise UserError(f"{path}: the last code cell has no closing ```")
    close()
    return cells


def _settings_cell(cells):
    found = [source for kind, source, tags in cells if kind == "code" and "settings" in tags]
    if len(found) != 1:
        raise UserError(f"{TEMPLATE} needs exactly one code cell tagged settings, found {len(found)}")
    return found[0]


def _assignments(source):
    """{NAME: ast.Assign} of the settings cell, which must assign exactly SETTINGS, one literal each."""
    found = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.lineno == node.end_lineno):
            raise UserError(f"{TEMPLATE}: the settings cell may only hold one-line NAME = value assignments")
        found[node.targets[0].id] = node
    if tuple(found) != SETTINGS:
        raise UserError(f"{TEMPLATE}: the settings cell assigns {', '.join(found)}, not {', '.join(SETTINGS)}")
    return found


def template_settings(cells=None):
    """{NAME: value} of the template's settings cell: the notebook's defaults."""
    nodes = _assignments(_settings_cell(read_template() if cells is None else cells))
    return {name: ast.literal_eval(node.value) for name, node in nodes.items()}


def _python_literal(value):
    """None, a whole number or a string (double-quoted, like the template's) as Python source."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def settings_source(source, values):
    """The settings cell `source` with the values of `values` ({NAME: value}) written in; comments stay put."""
    nodes = _assignments(source)
    lines = source.split("\n")
    for name, value in values.items():
        node = nodes[name]
        line = lines[node.lineno - 1]
        code, comment = line[:node.value.end_col_offset], line[node.value.end_col_offset:]
        new = code[:node.value.col_offset] + _python_literal(value)
        if comment.strip():  # keep the comment's column when the new value leaves room for it
            column = len(code) + len(comment) - len(comment.lstrip())
            new = new.ljust(column) if len(new) + 2 <= column else new + "  "
            comment = comment.lstrip()
        lines[node.lineno - 1] = new + comment
    return "\n".join(lines)


def check_session(device, gpu):
    """Refuse a DEVICE the session cannot give (the Setup cell would fail after the push and Kaggle's queue), or a
    GPU session a CPU run would waste."""
    if device == "gpu" and not gpu:
        raise UserError("DEVICE=gpu asks for a GPU that a CPU session lacks: add GPU=1 (a T4 session), or use "
                        "DEVICE=auto")
    if device == "cpu" and gpu:
        raise UserError("GPU=1 with DEVICE=cpu would spend Kaggle's weekly GPU quota on a CPU run: drop GPU=1, "
                        "or use DEVICE=auto")


def check_settings(values):
    """The template's settings updated with `values` ({NAME: value}), checked as the notebook will check them."""
    merged = {**template_settings(), **values}
    kaggle_env.settings(*(merged[name] for name in SETTINGS))  # UserError on a bad value
    return merged


def build_notebook(files, settings=None):
    """The notebook (an nbformat NotebookNode): the template's cells, `settings` ({NAME: value}) written into the
    settings cell, the bundle of `files` into the bundle cell. Cell ids are fixed for byte-identical output."""
    import nbformat
    from nbformat import v4

    cells = []
    for kind, source, tags in read_template():
        if kind == "markdown":
            cells.append(v4.new_markdown_cell(source))
            continue
        if "bundle" in tags:
            cell = v4.new_code_cell(bundle_cell(files))
            cell.metadata.update({"_kg_hide-input": True, "jupyter": {"source_hidden": True}})
        elif "settings" in tags:
            cell = v4.new_code_cell(settings_source(source, check_settings(settings or {})))
        else:
            cell = v4.new_code_cell(source)
        if tags:
            cell.metadata["tags"] = list(tags)
        cells.append(cell)
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i:02d}"
    nb = v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nb.metadata["pipeline"] = {"built_cells_sha256": own_cells_sha256(nb)}  # what a rebuild may overwrite
    nbformat.validate(nb)
    return nb


def own_cells_sha256(nb):
    """sha256 of the notebook's cells other than the settings and the bundle (the ones a user edits by hand)."""
    own = [[c.cell_type, c.source.replace("\r\n", "\n").rstrip()] for c in nb.cells  # as editors save them
           if not {"settings", "bundle"} & set(c.metadata.get("tags", []))]
    return hashlib.sha256(json.dumps(own).encode()).hexdigest()


def notebook_text(files=None, settings=None):
    import nbformat

    return nbformat.writes(build_notebook(bundle_files() if files is None else files, settings)) + "\n"


def bundle_source_of(notebook):
    """The source of the notebook's bundle cell (a path or its text as JSON), or None when it has none."""
    import nbformat

    try:
        text = notebook.read_text(encoding="utf-8") if isinstance(notebook, Path) else notebook
        nb = nbformat.reads(text, as_version=4)
    except (OSError, ValueError, RecursionError) as exc:  # an edit that broke its JSON: NotJSONError is a ValueError
        where = notebook if isinstance(notebook, Path) else "the notebook"
        raise UserError(f"{where} is not a readable notebook ({str(exc).splitlines()[0][:200]}): undo the edit, "
                        f"or `make kernel` builds it anew") from None
    found = [c.source for c in nb.cells if c.cell_type == "code" and "bundle" in c.metadata.get("tags", [])]
    return found[0] if len(found) == 1 else None


# ---------------------------------------------------------------- metadata and id

def parse_kernel_id(kernel_id):
    """(owner, slug) of 'owner/slug'; UserError when it is not a valid Kaggle kernel id."""
    owner, _, slug = str(kernel_id).partition("/")
    if not OWNER.fullmatch(owner) or not SLUG.fullmatch(slug) or not 5 <= len(slug) <= 50:
        raise UserError(f"kernel id '{kernel_id}' is not OWNER/SLUG (the slug: 5 to 50 lower-case letters, digits "
                        f"and single hyphens, e.g. yourname/{DEFAULT_SLUG})")
    return owner, slug


def title_for(slug):
    """A title Kaggle turns back into `slug` (it slugifies titles): the slug's words, capitalized."""
    return DEFAULT_TITLE if slug == DEFAULT_SLUG else " ".join(word.capitalize() for word in slug.split("-"))


def read_metadata(folder):
    path = Path(folder) / METADATA
    if not path.is_file():
        raise UserError(f"{path} is missing: build the kernel first (`make kernel`)")
    try:
        meta = json_loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("code_file", NOTEBOOK), str):  # a hand edit
        raise UserError(f"{path} is not Kaggle's kernel metadata (an object with an id and a code_file name): "
                        f"rebuild it (`make kernel`)")
    parse_kernel_id(meta.get("id", ""))
    return meta


def resolve_kernel_id(explicit, folder, environ):
    """--id, else KAGGLE_KERNEL_ID, else the credentials' username + DEFAULT_SLUG, else the folder's current id."""
    kernel_id = explicit or environ.get("KAGGLE_KERNEL_ID")
    if not kernel_id and kaggle_api.local_username():
        kernel_id = f"{kaggle_api.local_username()}/{DEFAULT_SLUG}"
    if not kernel_id and (Path(folder) / METADATA).is_file():
        kernel_id = read_metadata(folder)["id"]
    if not kernel_id:
        raise UserError(f"no kernel id: set KAGGLE_KERNEL_ID=<your-kaggle-username>/{DEFAULT_SLUG} (or "
                        f"`make kernel KAGGLE_KERNEL_ID=...`), or Kaggle credentials that name a username "
                        f"(KAGGLE_USERNAME, or kaggle.json)")
    parse_kernel_id(kernel_id)
    return kernel_id


def metadata_text(kernel_id, gpu=False, continue_run=False):
    """kernel-metadata.json: the defaults of kernels/digit-recognizer/, the id and its title; `gpu` asks for a
    T4 session (else a CPU one); `continue_run` attaches the kernel's own previous output as an input."""
    _, slug = parse_kernel_id(kernel_id)
    try:
        defaults = json_loads(METADATA_DEFAULTS.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{METADATA_DEFAULTS}: {exc}") from None
    meta = {"id": kernel_id, "title": title_for(slug), "code_file": NOTEBOOK, **defaults}
    meta["enable_gpu"] = bool(gpu)
    if gpu:
        meta["machine_shape"] = GPU_MACHINE_SHAPE
    if continue_run and kernel_id not in meta["kernel_sources"]:
        meta["kernel_sources"] = [*meta["kernel_sources"], kernel_id]
    return json.dumps(meta, indent=2) + "\n"


def generate(out, kernel_id, settings=None, gpu=False, continue_run=False):
    """Build kernel-metadata.json and the notebook (its settings cell given `settings`, {NAME: value}) into
    `out`; returns their paths."""
    out = Path(out)
    notebook = notebook_text(settings=settings)
    if len(notebook.encode()) >= SOURCE_LIMIT:
        raise UserError(f"the notebook is {len(notebook.encode())} bytes, over Kaggle's limit of {SOURCE_LIMIT}")
    write_text(out / NOTEBOOK, notebook)
    write_text(out / METADATA, metadata_text(kernel_id, gpu, continue_run))
    return out / METADATA, out / NOTEBOOK


def refuse_to_overwrite_edits(out, given):
    """The notebook in `out` is rebuilt whole: a cell edited by hand since it was built (any but the settings
    cell, whose values `make kernel` is given, and the bundle) would be lost unsaid. Refused, unless FORCE=1.
    Told by the hash the build recorded, so a template changed since is no edit (a notebook built before the
    hash was kept is not protected). given: the make variables of this build, for the advice."""
    import nbformat

    path = Path(out) / NOTEBOOK
    try:
        old = nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)
        record = old.metadata.get("pipeline")
        built = record.get("built_cells_sha256") if isinstance(record, dict) else None
        now = own_cells_sha256(old) if built is not None else None
    except (OSError, ValueError, RecursionError, AttributeError, TypeError):
        return  # none, or not a notebook one could still edit: nothing to keep
    if built is not None and built != now:
        raise UserError(f"{path} has cells edited by hand since it was built: `make kernel` rebuilds the notebook "
                        f"whole; keep your edits elsewhere, then `{rebuild_command({**given, 'FORCE': 1})}`")


def built_options(folder):
    """{NAME: value}: the `make kernel` variables that rebuild the kernel in `folder` as it is (its settings
    cell, hand edits included, its session, whether it continues its own output, its id)."""
    import nbformat

    meta = read_metadata(folder)
    notebook = Path(folder) / meta.get("code_file", NOTEBOOK)
    try:
        nb = nbformat.reads(notebook.read_text(encoding="utf-8"), as_version=4)
        cells = [c.source for c in nb.cells if c.cell_type == "code" and "settings" in c.metadata.get("tags", [])]
        values = {name: ast.literal_eval(node.value) for name, node in _assignments(cells[0]).items()}
    except (OSError, ValueError, RecursionError, SyntaxError, IndexError, UserError) as exc:
        raise UserError(f"{notebook} has no readable settings cell ({exc}): build it again (`make kernel`, with "
                        f"the settings you want)") from None
    options = {name: value for name, value in values.items() if value is not None}
    options["GPU"] = int(bool(meta.get("enable_gpu")))
    options["CONTINUE"] = int(meta["id"] in meta.get("kernel_sources", []))
    options["KAGGLE_KERNEL_ID"] = meta["id"]
    return options


def rebuild_command(options):
    return "make kernel " + " ".join(f"{name}={shlex.quote(str(value))}" for name, value in options.items()
                                     if (name not in ("GPU", "CONTINUE") or value))


def refuse_options_the_build_lacks(folder, environ):
    """`make kernel-push GPU=1 PRESET=quick` over an existing build pushed the build as it was, unsaid: push takes
    no options, so a variable given to it must be what the build already holds."""
    def canonical(name, text):  # as `make kernel` would build it: EPOCHS=02 is 2; an empty value is not given
        try:
            return int(text) if name in ("EPOCHS", "SEED", "GPU", "CONTINUE") else text
        except ValueError:
            return text

    refuse_cased_settings(environ)
    given = {name: canonical(name, environ.get(f"PIPELINE_VAR_{name}", ""))
             for name in environ.get("PIPELINE_MAKE_VARS", "").split()
             if name in (*SETTINGS, "GPU", "CONTINUE", "KAGGLE_KERNEL_ID") and environ.get(f"PIPELINE_VAR_{name}")}
    if not given:
        return
    built = built_options(folder)
    differ = [name for name, value in given.items() if built.get(name) != value]
    if differ:
        now = ", ".join(f"{name}={built.get(name, '(the preset default)')}" for name in differ)
        wanted = {**built, **{name: given[name] for name in differ}}
        if wanted.get("GPU") and wanted.get("DEVICE") == "cpu":  # a build `make kernel` would refuse
            wanted["DEVICE"] = "auto"
        raise UserError(f"{folder} was built with {now}, and push sends the build as it is: build it with what you "
                        f"gave first (`{rebuild_command(wanted)}`), then push")


# ---------------------------------------------------------------- Kaggle

def push(folder, poll_interval=POLL_INTERVAL, max_polls=MAX_POLLS, retries=kaggle_api.RETRIES,
         base_delay=kaggle_api.BASE_DELAY, sleep=time.sleep):
    """Push the kernel, then wait for its run: 0 when complete, 3 when still running after max_polls polls."""
    folder = Path(folder)
    meta = read_metadata(folder)
    kernel_id = meta["id"]
    owner, slug = parse_kernel_id(kernel_id)
    notebook = folder / meta.get("code_file", NOTEBOOK)
    if not notebook.is_file():
        raise UserError(f"{notebook} is missing: build the kernel first (`make kernel`)")
    if bundle_source_of(notebook) != bundle_cell(bundle_files()):
        raise UserError(f"{notebook} does not bundle the current pipeline/ sources: rebuild it as it was built "
                        f"(`{rebuild_command(built_options(folder))}`)")
    built = built_options(folder)  # the settings cell as edited by hand since: checked as generate checks them
    check_session(check_settings({name: built[name] for name in SETTINGS if name in built})["DEVICE"], built["GPU"])
    user = kaggle_api.kernel_owner()
    if user and user != owner:
        raise UserError(f"{folder / METADATA} names kernel '{kernel_id}' but the credentials are {user}'s: "
                        f"regenerate it with `make kernel KAGGLE_KERNEL_ID={user}/{slug}`")
    pushed = kaggle_api.push_kernel(folder, kernel_id, retries=retries, base_delay=base_delay)
    print(f"pushed {kernel_id} (version {pushed['version']}): {pushed['url']}", flush=True)
    status = None
    for poll in range(1, max_polls + 1):
        sleep(poll_interval)  # before the first poll too: right after a push the status may still be the last run's
        now, failure = kaggle_api.kernel_status(kernel_id, retries=retries, base_delay=base_delay)
        if now != status:
            print(f"{kernel_id}: {now}", flush=True)
            status = now
        if now == "complete":
            print(f"{kernel_id} has finished: `make kernel-output` downloads its submission.csv")
            return 0
        if now not in PENDING:
            raise UserError(f"the run of kernel '{kernel_id}' ended with status {now}: {failure or 'no message'} "
                            f"(its log: {pushed['url']})")
    print(f"{kernel_id} is still {status} after {max_polls} polls; `python -m pipeline.kernel status` asks again",
          file=sys.stderr)
    return 3


def download_output(folder, out, retries=kaggle_api.RETRIES, base_delay=kaggle_api.BASE_DELAY,
                    expected_rows=COMPETITION_TEST_ROWS):
    """Download the kernel run's submission.csv (and log) into `out`, checked before it is moved in: one row
    for each of the competition's test images, whatever data this machine has prepared."""
    from pipeline.submit import validate_submission

    kernel_id = read_metadata(folder)["id"]
    # Kaggle lists the output of the latest *finished* run: while a new version is queued or running, or after
    # it failed, that is an earlier version's submission, which nothing in it tells apart
    status, failure = kaggle_api.kernel_status(kernel_id, retries=retries, base_delay=base_delay)
    if status != "complete":
        why = f" ({failure})" if failure else ""
        raise UserError(f"the latest run of kernel '{kernel_id}' is {status}{why}, so its output would be an earlier "
                        f"version's: `make kernel-output` once it is complete (`python -m pipeline.kernel status`)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".kernel-output-", dir=out.parent) as tmp:
        files = kaggle_api.download_kernel_output(kernel_id, tmp, r"^submission\.csv$", retries=retries,
                                                  base_delay=base_delay)
        csv = Path(tmp) / "submission.csv"
        if not csv.is_file():
            got = ", ".join(p.name for p in files) or "nothing"
            raise UserError(f"the output of kernel '{kernel_id}' has no submission.csv (got: {got}): has its run "
                            f"completed? (`python -m pipeline.kernel status`)")
        rows = expected_rows
        validate_submission(csv, rows, name=f"submission.csv of kernel '{kernel_id}'")
        logs = [p for p in files if p.suffix == ".log"]
        if logs:
            write_bytes(out / "kernel.log", logs[0].read_bytes())
        write_bytes(out / "submission.csv", csv.read_bytes())
        if logs and stopped_by_max_time(logs[0].read_text(errors="replace")):
            try:  # the build's own settings, so that the rebuild continues this run and not the template's
                again = rebuild_command({**built_options(folder), "CONTINUE": 1})
            except UserError:
                again = "make kernel CONTINUE=1 (with the settings it was built with)"
            print(f"note: the run of kernel '{kernel_id}' stopped at MAX_TIME before its training ended (its log says "
                  f"so): this submission.csv is from the unfinished run; `{again}` and `make kernel-push` continue "
                  f"it", file=sys.stderr)
    return out / "submission.csv", rows


def stopped_by_max_time(log_text):
    """Whether a kernel run's log holds train's line for a run stopped by MAX_TIME (within an epoch, or before a
    member)."""
    return console.MAX_TIME_REACHED in log_text


# ---------------------------------------------------------------- command line

def build_parser():
    p = StageArgumentParser(prog="python -m pipeline.kernel", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    g = sub.add_parser("generate", help="build kernel-metadata.json and the notebook (the default)")
    g.add_argument("--id", help="OWNER/SLUG (default: KAGGLE_KERNEL_ID, else the credentials' username)")
    g.add_argument("--out", type=Path, default=BUILD_DIR, help="output folder (default: build/kernel)")
    g.add_argument("--preset", help="PRESET of the settings cell (default: the template's)")
    g.add_argument("--epochs", type=int, help="EPOCHS of the settings cell (default: the preset's own)")
    g.add_argument("--max-time", help="MAX_TIME of the settings cell, e.g. 10h or 90m")
    g.add_argument("--device", choices=kaggle_env.DEVICES, help="DEVICE of the settings cell")
    g.add_argument("--seed", type=int, help="SEED of the settings cell")
    g.add_argument("--gpu", action="store_true", help=f"ask Kaggle for a T4 session ({GPU_MACHINE_SHAPE}); "
                                                      "default: a CPU session")
    g.add_argument("--continue", dest="continue_run", action="store_true",
                   help="attach the kernel's own previous output as an input, to continue its run")
    g.add_argument("--force", action="store_true",
                   help="build even over cells of the notebook edited by hand (FORCE=1); they are lost")
    for name, text in (("push", "push the built kernel and wait for its run"),
                       ("status", "the status of its latest run"), ("output", "download the run's submission.csv")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--folder", type=Path, default=BUILD_DIR, help="the built kernel (default: build/kernel)")
        if name == "push":
            s.add_argument("--poll-interval", type=float, default=POLL_INTERVAL, help="seconds between status polls")
            s.add_argument("--max-polls", type=int, default=MAX_POLLS, help="give up waiting after this many polls")
        if name == "output":
            s.add_argument("--out", type=Path, default=None,
                           help="folder for submission.csv (default: submissions/kernel)")
    return p


def continued_settings(out, settings):
    """The settings for `make kernel CONTINUE=1` over the build in `out`: the preset, epochs and seed that name
    its run are the build's when not given, since the template's (`standard`, seed 0) name another run, which
    trained afresh beside the one to continue. MAX_TIME, DEVICE and the session (GPU=) continue any run: as
    given. Said in a line; a build that cannot be read (none, an older or damaged one) keeps nothing."""
    naming = [name for name in RUN_NAMING if name not in settings]
    if not naming or not (Path(out) / METADATA).is_file():
        return settings
    try:
        built = built_options(out)
    except UserError as exc:
        print(f"CONTINUE=1: the build in {out} cannot be read ({exc}), so its run's settings are not kept: give "
              f"{', '.join(f'{name}=' for name in naming)} as the run to continue was built", file=sys.stderr)
        return settings
    kept = {name: built[name] for name in naming if name in built}
    if kept:
        print(f"CONTINUE=1: keeping the build's {', '.join(f'{k}={v}' for k, v in kept.items())}, which name the "
              f"run it continues (give them to change)")
    return {**settings, **kept}


def refuse_cased_settings(environ):
    """`make kernel epochs=3` (train takes settings in any case): make passes the notebook's settings only in
    capitals, so the build kept EPOCHS = None, unsaid; `make kernel-push epochs=3` pushed the build as it was."""
    cased = [v for v in environ.get("PIPELINE_MAKE_VARS", "").split() if v.upper() in SETTINGS and v != v.upper()]
    if cased:
        raise UserError(f"{cased[0]}=: the notebook's settings are written in capitals for make kernel: "
                        f"{cased[0].upper()}=")


def refuse_unused_settings(environ):
    """`make kernel LR=1`: a training setting the settings cell does not hold would never reach the notebook."""
    from pipeline.config import TrainConfig

    refuse_cased_settings(environ)
    names = {f.name.upper() for f in dataclasses.fields(TrainConfig)} - set(SETTINGS)
    exported = set(environ.get("PIPELINE_ENV_SETTINGS", "").split())  # (VAL_FRACTION=0.2 for make train: not ours)
    unused = [v for v in environ.get("PIPELINE_MAKE_VARS", "").split() if v.upper() in names and v not in exported]
    if unused:
        raise UserError(f"{', '.join(unused)}: the notebook's settings cell holds only {', '.join(SETTINGS)}, so "
                        f"the notebook would train without {'it' if len(unused) == 1 else 'them'}; set other "
                        f"settings in the preset's file in configs/, which the notebook bundles")


@cli_main
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "generate")
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        refuse_unused_settings(os.environ)
        kernel_id = resolve_kernel_id(args.id, args.out, os.environ)
        given = {"PRESET": args.preset, "EPOCHS": args.epochs, "MAX_TIME": args.max_time, "DEVICE": args.device,
                 "SEED": args.seed}
        settings = {name: value for name, value in given.items() if value is not None}
        if args.continue_run:
            settings = continued_settings(args.out, settings)
        check_session(check_settings(settings)["DEVICE"], args.gpu)
        if not args.force:
            refuse_to_overwrite_edits(args.out, {**settings, "GPU": int(args.gpu), "CONTINUE": int(args.continue_run),
                                                 **({"KAGGLE_KERNEL_ID": args.id} if args.id else {})})
        meta, notebook = generate(args.out, kernel_id, settings, args.gpu, args.continue_run)
        print(f"wrote {meta} ({kernel_id}, {'a T4 GPU' if args.gpu else 'a CPU'} session"
              f"{', continuing its previous output' if args.continue_run else ''}) and {notebook}")
        return 0
    if args.command == "push":
        if args.max_polls < 1 or not 0 <= args.poll_interval <= 3600:  # nan and inf fail too: sleep() raised
            raise UserError("--max-polls must be at least 1 and --poll-interval from 0 to 3600 seconds")
        refuse_options_the_build_lacks(args.folder, os.environ)
        return push(args.folder, args.poll_interval, args.max_polls)
    if args.command == "status":
        kernel_id = read_metadata(args.folder)["id"]
        status, failure = kaggle_api.kernel_status(kernel_id)
        print(f"{kernel_id}: {status}" + (f" ({failure})" if failure else ""))
        return 0
    path, rows = download_output(args.folder, args.out or paths.submissions() / "kernel")
    print(f"{path}: {rows} rows from kernel '{read_metadata(args.folder)['id']}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
