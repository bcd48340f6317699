"""Stage `kernel`: the same pipeline as a Kaggle notebook, and its life on Kaggle.

    python -m pipeline.kernel [generate] [--id OWNER/SLUG] [--out kernels/digit-recognizer]
    python -m pipeline.kernel push   [--folder DIR] [--poll-interval 30] [--max-polls 1500]
    python -m pipeline.kernel status [--folder DIR]
    python -m pipeline.kernel output [--folder DIR] [--out submissions/kernel]

generate writes kernel-metadata.json and digit-recognizer.ipynb (built with nbformat). The notebook's
first code cell writes the pipeline modules it imports (found by following the imports from ENTRY_MODULES)
and the presets to working/pipeline-src, then a markdown and a code cell per stage call the stages'
main(argv) as the command line would. Same sources, same bytes: the files are committed and a test
fails when they drift from pipeline/. The kernel id is --id, else KAGGLE_KERNEL_ID, else the username
of the Kaggle credentials with the slug digit-recognizer-numpy-cnn, else the id already in the folder.

push uploads the folder (SaveKernel), then asks the run's status every --poll-interval seconds until it
is complete or failed, at most --max-polls times (exit 3 when still running). output downloads the run's
submission.csv, checks it and moves it into submissions/kernel/ with the run's log.
"""
import argparse
import os
import ast
import base64
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from pipeline import kaggle_api, paths
from pipeline.errors import StageArgumentParser, UserError, cli_main
from pipeline.fileio import write_bytes, write_text

KERNEL_DIR = paths.REPO / "kernels" / "digit-recognizer"
NOTEBOOK = "digit-recognizer.ipynb"
METADATA = "kernel-metadata.json"
DEFAULT_SLUG = "digit-recognizer-numpy-cnn"
DEFAULT_TITLE = "Digit Recognizer NumPy CNN"   # Kaggle derives the slug from the title: they must agree
# The modules the notebook's cells import; the bundle is these plus everything they import from pipeline.
ENTRY_MODULES = ("pipeline.kaggle_env", "pipeline.prepare", "pipeline.train", "pipeline.predict",
                 "pipeline.submit", "pipeline.report")
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
    """The first code cell: write the bundle to working/pipeline-src and import pipeline from there."""
    entries = "".join(f"    {name!r}: {_literal(text)},\n" for name, text in files.items())
    return f'''# Our pipeline package, written to disk by this cell. Generated by `python -m pipeline.kernel` from the
# repository's pipeline/ and configs/: change those and regenerate (`make kernel`), never this cell.
import base64
import importlib
import os
import sys
from pathlib import Path

SOURCES = {{
{entries}}}

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

INTRO = f"""# Digit Recognizer: a CNN written by hand in NumPy (CuPy on the GPU)

No PyTorch, no TensorFlow: the network, its backward pass and its optimizer are plain array code that
runs on NumPy, or on CuPy through the very same code when a GPU is present. The notebook runs the
repository's pipeline stage by stage, the way `make train submit` does on a laptop:

1. find the competition data under `/kaggle/input`
2. prepare it: strict CSV validation, normalization, a stratified validation split
3. train a preset within a time budget, checkpointing into `/kaggle/working` so a re-run continues
4. select the delivered model by validation and predict the test set
5. write `/kaggle/working/submission.csv`
6. show the training curves and the validation confusion matrix

*Generated by `python -m pipeline.kernel` from the repository's sources; do not edit it here, regenerate it.*"""

STAGES = [
    ("## The code\n\nThe cell below (its input is hidden) writes the pipeline's modules, exactly as they are in "
     "the repository, into `/kaggle/working/pipeline-src` and imports them from there.", None),
    ("## Settings\n\nThe preset and training budget: `standard` trains one augmented `deotte` net for up to 10 "
     "hours, well inside Kaggle's 12-hour sessions. Environment variables `DIGIT_PRESET`, "
     "`DIGIT_TRAIN_BUDGET`, `DIGIT_OVERRIDES` and `DIGIT_RUN` override them. Every stage writes under "
     "`/kaggle/working/pipeline` (`PIPELINE_ROOT`).",
     '''import numpy as np

from pipeline import kaggle_env
from pipeline.config import build_config
from pipeline.nn import select_device

settings = kaggle_env.settings()
PIPELINE_ROOT = kaggle_env.use_working_dir()
print(settings)
print("outputs under", PIPELINE_ROOT)
device = select_device(build_config(settings.preset, settings.overrides).device)  # the one training will use
print("device:", "GPU (CuPy)" if device is not np else "CPU (NumPy)")'''),
    ("## Find the data\n\n`/kaggle/input/digit-recognizer`, `/kaggle/input/competitions/digit-recognizer`, or "
     "wherever below `/kaggle/input` a folder holds `train.csv` and `test.csv`.",
     '''data_dir = kaggle_env.find_competition_data()
print(data_dir, sorted(p.name for p in data_dir.iterdir()))'''),
    ("## Prepare\n\nEvery row and value is checked before anything is written; pixels become float32 in [0, 1] "
     "and a stratified tenth of `train.csv` is held out for validation.",
     '''from pipeline import prepare

kaggle_env.run_stage(prepare.main, ["--raw", data_dir]);'''),
    ("## Train\n\nResumes from the newest checkpoint when this session (or an earlier version's output attached "
     "as an input) has one. When the budget runs out, training stops with a checkpoint and the best weights "
     "so far are delivered; the next run of the notebook continues.",
     '''from pipeline import runs, train

restored = kaggle_env.restore_earlier_run(settings.run)
if restored:
    print("continuing the run found in", restored)
code = kaggle_env.run_stage(train.main, ["--preset", settings.preset, "--run", settings.run,
                                         f"MAX_TIME={settings.train_budget}", *settings.overrides], ok=(0, 3))
run_folder = runs.run_dir(settings.run)
if code == 3:  # out of time: submit the best weights so far, train on next time
    kaggle_env.deliver_best_so_far(run_folder)'''),
    ("## Select\n\nTraining kept the weights of the epoch with the best validation accuracy; an ensemble preset "
     "chooses its blend of members by the rows each member held out.",
     '''kaggle_env.select(run_folder);'''),
    ("## Predict\n\nClass probabilities of the selected model for every test image (on the GPU when there is one).",
     '''from pipeline import predict

kaggle_env.run_stage(predict.main, ["--run", settings.run]);'''),
    ("## Write the submission\n\n`ImageId,Label` for every test image, validated before it is written.",
     '''import pandas as pd

from pipeline import submit

SUBMISSION = kaggle_env.working_dir() / "submission.csv"
kaggle_env.run_stage(submit.main, ["--run", settings.run, "--upload", "0", "--out", SUBMISSION])
pd.read_csv(SUBMISSION).head()'''),
    ("## Curves and confusion matrix\n\nLoss and accuracy per epoch, then the validation confusion matrix of the "
     "delivered model (colour marks the errors).",
     '''from IPython.display import Image, display

from pipeline import report

report_dir = report.write_report(kaggle_env.report_folder(run_folder)).parent
for figure in ("curves.png", "confusion.png"):
    display(Image(filename=str(report_dir / figure)))'''),
    ("## Tidy up\n\nThe processed arrays are rebuilt from the input in seconds: they are removed so the saved "
     "output holds the run (checkpoints, model, figures) and `submission.csv`.",
     '''import shutil

from pipeline import paths

shutil.rmtree(paths.data_processed(), ignore_errors=True)
print(sorted(p.name for p in kaggle_env.working_dir().iterdir()))'''),
]


def build_notebook(files):
    """The notebook (an nbformat NotebookNode) for the bundle `files`; cell ids are fixed for byte-identical output."""
    import nbformat
    from nbformat import v4

    cells = [v4.new_markdown_cell(INTRO)]
    for markdown, code in STAGES:
        cells.append(v4.new_markdown_cell(markdown))
        if code is None:
            cell = v4.new_code_cell(bundle_cell(files))
            cell.metadata.update({"_kg_hide-input": True, "jupyter": {"source_hidden": True}})
        else:
            cell = v4.new_code_cell(code)
        cells.append(cell)
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i:02d}"
    nb = v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(nb)
    return nb


def notebook_text(files=None):
    import nbformat

    return nbformat.writes(build_notebook(bundle_files() if files is None else files)) + "\n"


# ---------------------------------------------------------------- metadata and id

def parse_kernel_id(kernel_id):
    """(owner, slug) of 'owner/slug'; UserError when it is not a valid Kaggle kernel id."""
    owner, _, slug = str(kernel_id).partition("/")
    if not OWNER.match(owner) or not SLUG.match(slug) or not 5 <= len(slug) <= 50:
        raise UserError(f"kernel id '{kernel_id}' is not OWNER/SLUG (the slug: 5 to 50 lower-case letters, digits "
                        f"and single hyphens, e.g. yourname/{DEFAULT_SLUG})")
    return owner, slug


def title_for(slug):
    """A title Kaggle turns back into `slug` (it slugifies titles): the slug's words, capitalized."""
    return DEFAULT_TITLE if slug == DEFAULT_SLUG else " ".join(word.capitalize() for word in slug.split("-"))


def read_metadata(folder):
    path = Path(folder) / METADATA
    if not path.is_file():
        raise UserError(f"{path} is missing: generate the kernel first (`make kernel`)")
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: invalid JSON ({exc})") from None
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


def metadata_text(kernel_id):
    _, slug = parse_kernel_id(kernel_id)
    meta = {
        "id": kernel_id,
        "title": title_for(slug),
        "code_file": NOTEBOOK,
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": True,
        "enable_tpu": False,
        "enable_internet": False,
        "dataset_sources": [],
        "competition_sources": [kaggle_api.COMPETITION],
        "kernel_sources": [],
        "model_sources": [],
    }
    return json.dumps(meta, indent=2) + "\n"


def generate(out, kernel_id):
    """Write kernel-metadata.json and the notebook into `out`; returns their paths."""
    out = Path(out)
    notebook = notebook_text()
    write_text(out / NOTEBOOK, notebook)
    write_text(out / METADATA, metadata_text(kernel_id))
    return out / METADATA, out / NOTEBOOK


# ---------------------------------------------------------------- Kaggle

def push(folder, poll_interval=POLL_INTERVAL, max_polls=MAX_POLLS, retries=kaggle_api.RETRIES,
         base_delay=kaggle_api.BASE_DELAY, sleep=time.sleep):
    """Push the kernel, then wait for its run: 0 when complete, 3 when still running after max_polls polls."""
    folder = Path(folder)
    meta = read_metadata(folder)
    kernel_id = meta["id"]
    owner, slug = parse_kernel_id(kernel_id)
    notebook = folder / meta.get("code_file", NOTEBOOK)
    if not notebook.is_file() or notebook.read_text(encoding="utf-8") != notebook_text():
        raise UserError(f"{notebook} does not match the pipeline/ sources: regenerate it (`make kernel`)")
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


def download_output(folder, out, retries=kaggle_api.RETRIES, base_delay=kaggle_api.BASE_DELAY):
    """Download the kernel run's submission.csv (and log) into `out`, checked before it is moved in."""
    from pipeline.submit import validate_submission

    kernel_id = read_metadata(folder)["id"]
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
        rows = max(len(csv.read_bytes().splitlines()) - 1, 0)
        validate_submission(csv, rows, name=f"submission.csv of kernel '{kernel_id}'")
        logs = [p for p in files if p.suffix == ".log"]
        if logs:
            write_bytes(out / "kernel.log", logs[0].read_bytes())
        write_bytes(out / "submission.csv", csv.read_bytes())
    return out / "submission.csv", rows


# ---------------------------------------------------------------- command line

def build_parser():
    p = StageArgumentParser(prog="python -m pipeline.kernel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    g = sub.add_parser("generate", help="write kernel-metadata.json and the notebook (the default)")
    g.add_argument("--id", help="OWNER/SLUG (default: KAGGLE_KERNEL_ID, else the credentials' username)")
    g.add_argument("--out", type=Path, default=KERNEL_DIR, help="output folder (default: kernels/digit-recognizer)")
    for name, text in (("push", "push the kernel and wait for its run"), ("status", "the status of its latest run"),
                       ("output", "download the run's submission.csv")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--folder", type=Path, default=KERNEL_DIR,
                       help="the kernel folder (default: kernels/digit-recognizer)")
        if name == "push":
            s.add_argument("--poll-interval", type=float, default=POLL_INTERVAL, help="seconds between status polls")
            s.add_argument("--max-polls", type=int, default=MAX_POLLS, help="give up waiting after this many polls")
        if name == "output":
            s.add_argument("--out", type=Path, default=None,
                           help="folder for submission.csv (default: submissions/kernel)")
    return p


@cli_main
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "generate")
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        kernel_id = resolve_kernel_id(args.id, args.out, os.environ)
        meta, notebook = generate(args.out, kernel_id)
        print(f"wrote {meta} ({kernel_id}) and {notebook}")
        return 0
    if args.command == "push":
        if args.max_polls < 1 or args.poll_interval < 0:
            raise UserError("--max-polls must be at least 1 and --poll-interval not negative")
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
