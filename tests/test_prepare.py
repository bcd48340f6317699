"""prepare: malformed CSVs are refused with one line and touch nothing; accepted variants agree; the split."""
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import dataset, prepare
from pipeline.fileio import load_npz

REPO = Path(__file__).resolve().parent.parent
TRAIN_HEADER = "label," + ",".join(f"pixel{i}" for i in range(784))
TEST_HEADER = ",".join(f"pixel{i}" for i in range(784))
N_TRAIN, N_TEST = 30, 7


def make_rows(n, seed, with_labels):
    """Small valid tables: pixels mostly 0 with some 1..255 values, labels 0..9 three times each."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 784)) * (rng.random((n, 784)) < 0.3)
    pixels[0, :3] = [0, 255, 7]
    if not with_labels:
        return pixels
    labels = np.arange(n) % 10
    return np.column_stack([labels, pixels])


TRAIN = make_rows(N_TRAIN, 0, True)
TEST = make_rows(N_TEST, 1, False)


def csv_text(header, table):
    return header + "\n" + "".join(",".join(map(str, row)) + "\n" for row in table.tolist())


GOOD_TRAIN = csv_text(TRAIN_HEADER, TRAIN)
GOOD_TEST = csv_text(TEST_HEADER, TEST)


def write_raw(raw, train=GOOD_TRAIN, test=GOOD_TEST):
    raw.mkdir(parents=True, exist_ok=True)
    for name, content in (("train.csv", train), ("test.csv", test)):
        if content is None:
            (raw / name).unlink(missing_ok=True)
        else:
            (raw / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def run(raw, out, *extra):
    return prepare.main(["--raw", str(raw), "--out", str(out), *extra])


@pytest.fixture
def prepared(tmp_path):
    """A folder with a good earlier output of prepare, and its bytes."""
    raw, out = tmp_path / "raw", tmp_path / "processed"
    write_raw(raw)
    assert run(raw, out) == 0
    return raw, out, {p.name: p.read_bytes() for p in out.iterdir()}


def replace_line(text, index, new_line):
    lines = text.split("\n")
    lines[index] = new_line
    return "\n".join(lines)


def set_cell(text, line, col, value):
    cells = text.split("\n")[line].split(",")
    cells[col] = value
    return replace_line(text, line, ",".join(cells))


ROW3 = GOOD_TRAIN.split("\n")[3]
# (case id, train.csv content or None for missing, test.csv content, words the error must hold)
MALFORMED = [
    ("missing", None, GOOD_TEST, ["train.csv", "missing"]),
    ("empty", "", GOOD_TEST, ["train.csv", "empty"]),
    ("blank", "\n\n", GOOD_TEST, ["train.csv", "empty"]),
    ("header_only", TRAIN_HEADER + "\n", GOOD_TEST, ["no data rows"]),
    ("test_header_only", GOOD_TRAIN, TEST_HEADER, ["test.csv", "no data rows"]),
    ("float", set_cell(GOOD_TRAIN, 3, 11, "1.5"), GOOD_TEST, ["row 3 (line 4), column pixel10", "'1.5'", "not an integer"]),
    ("float_integral", set_cell(GOOD_TRAIN, 3, 11, "1.0"), GOOD_TEST, ["column pixel10", "not an integer"]),
    ("exponent", set_cell(GOOD_TRAIN, 2, 5, "1e2"), GOOD_TEST, ["row 2 (line 3), column pixel4", "not an integer"]),
    ("text", set_cell(GOOD_TRAIN, 5, 300, "abc"), GOOD_TEST, ["row 5 (line 6), column pixel299", "'abc'"]),
    ("negative", set_cell(GOOD_TRAIN, 1, 1, "-1"), GOOD_TEST, ["row 1 (line 2), column pixel0", "value -1 is outside 0..255"]),
    ("too_big", set_cell(GOOD_TRAIN, 17, 302, "256"), GOOD_TEST,
     ["row 17 (line 18), column pixel301: value 256 is outside 0..255"]),
    ("huge", set_cell(GOOD_TRAIN, 4, 9, "9" * 30), GOOD_TEST, ["row 4 (line 5), column pixel8", "outside 0..255"]),
    ("thousands_of_digits", set_cell(GOOD_TRAIN, 4, 9, "9" * 5000), GOOD_TEST,  # pandas read it as text: a traceback
     ["row 4 (line 5), column pixel8", "value 999999999999999999999999... is outside 0..255"]),
    ("nul_bytes", "\x00" * 300_000, GOOD_TEST, ["line 1 (header)", "not the competition's header"]),  # a cut copy
    ("label_10", set_cell(GOOD_TRAIN, 6, 0, "10"), GOOD_TEST, ["row 6 (line 7), column label", "outside 0..9"]),
    ("short_row", replace_line(GOOD_TRAIN, 8, ROW3.rsplit(",", 1)[0]), GOOD_TEST, ["row 8 (line 9)", "784 values where 785"]),
    ("long_row", replace_line(GOOD_TRAIN, 8, ROW3 + ",0"), GOOD_TEST, ["row 8 (line 9)", "786 values where 785"]),
    ("empty_line", replace_line(GOOD_TRAIN, 8, ""), GOOD_TEST, ["row 8 (line 9)", "empty line"]),
    ("trailing_blank_line", GOOD_TRAIN + "\n", GOOD_TEST, ["row 31 (line 32)", "empty line"]),
    ("missing_value", set_cell(GOOD_TRAIN, 9, 40, ""), GOOD_TEST, ["row 9 (line 10), column pixel39", "missing value"]),
    ("missing_last", set_cell(GOOD_TRAIN, 9, 784, ""), GOOD_TEST, ["column pixel783", "missing value"]),
    ("missing_label", set_cell(GOOD_TRAIN, 9, 0, ""), GOOD_TEST, ["row 9 (line 10), column label", "missing value"]),
    ("quoted_empty", set_cell(GOOD_TRAIN, 9, 3, '""'), GOOD_TEST, ["column pixel2", "missing value"]),
    ("bad_quote", set_cell(GOOD_TRAIN, 9, 3, '"12'), GOOD_TEST, ["row 9 (line 10), column pixel2", "'\"12'"]),
    ("spaces", set_cell(GOOD_TRAIN, 9, 3, " 12"), GOOD_TEST, ["column pixel2", "' 12'"]),
    ("plus", set_cell(GOOD_TRAIN, 9, 3, "+12"), GOOD_TEST, ["column pixel2", "'+12'"]),
    ("duplicate_header", replace_line(GOOD_TRAIN, 0, TRAIN_HEADER.replace("pixel1,", "pixel0,", 1)), GOOD_TEST,
     ["line 1 (header), column 3", "'pixel0'", "duplicate of column 2"]),
    ("renamed_header", replace_line(GOOD_TRAIN, 0, "Label" + TRAIN_HEADER[5:]), GOOD_TEST,
     ["line 1 (header), column 1", "'Label'"]),
    ("header_short", replace_line(GOOD_TRAIN, 0, TRAIN_HEADER.rsplit(",", 1)[0]), GOOD_TEST,
     ["line 1 (header)", "784 columns where 785", "'pixel783' is missing"]),
    ("test_with_label_header", GOOD_TRAIN, GOOD_TRAIN, ["test.csv", "line 1 (header)", "'label'"]),
    ("not_utf8_header", ("\xe9" + TRAIN_HEADER[1:]).encode("latin-1") + GOOD_TRAIN.encode()[len(TRAIN_HEADER):],
     GOOD_TEST, ["line 1 (header)", "UTF-8"]),
    ("stray_cr", set_cell(GOOD_TRAIN, 1, 5, "0\r0"), GOOD_TEST, ["line 2", "carriage return"]),
    ("absent_label", "\n".join([GOOD_TRAIN.split("\n")[0]] + [ln for ln in GOOD_TRAIN.split("\n")[1:]
                                                              if not ln.startswith("7,")]), GOOD_TEST,
     ["train.csv", "no row has label 7"]),
    ("test_too_big", GOOD_TRAIN, set_cell(GOOD_TEST, 7, 783, "300"), ["test.csv", "row 7 (line 8), column pixel783",
                                                                      "value 300 is outside 0..255"]),
]


def test_a_second_prepare_at_once_waits_and_a_mixed_output_is_prepared_again(prepared, capsys):
    # two prepares at once mixed meta.json of one with split.npz of the other, and every later
    # `prepare --if-needed` said "nothing to do" while training held out another fraction of the rows
    from pipeline.fileio import load_npz, save_npz
    from tests.lock_holder import held_elsewhere

    raw, out, before = prepared
    lock = out.parent / f".{out.name}.lock"
    lock.write_text("pid 4242 (prepare, since today)")
    with held_elsewhere(lock, seconds=1.5):
        started = time.monotonic()
        assert run(raw, out, "--if-needed") == 0  # waits for the other, then finds nothing to do
        assert time.monotonic() - started > 0.5
        captured = capsys.readouterr()
        assert "waiting for pid 4242 (prepare" in captured.err and "nothing to do" in captured.out, captured
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    split = load_npz(out / "split.npz")  # what the race left: another split than meta.json's
    save_npz(out / "split.npz", {"train_idx": split["train_idx"][:-5], "val_idx": split["val_idx"][:-1]})
    capsys.readouterr()
    assert run(raw, out, "--if-needed") == 0
    assert "nothing to do" not in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("case,train,test,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_csv_is_refused_without_touching_outputs(case, train, test, words, prepared, capsys):
    raw, out, before = prepared
    capsys.readouterr()
    write_raw(raw, train, test)
    assert run(raw, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_options_are_refused(prepared, capsys):
    raw, out, before = prepared
    assert run(raw, out, "--val-fraction", "1.5") == 2
    assert "val_fraction" in capsys.readouterr().err
    assert run(raw, out, "--split-seed", "-1") == 2  # a traceback (numpy's ValueError) before
    err = capsys.readouterr().err
    assert err.startswith("error: the split seed must be 0 or more") and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_subprocess_reports_one_line_and_exit_code_2(prepared):
    raw, out, before = prepared
    write_raw(raw, set_cell(GOOD_TRAIN, 17, 302, "256"))
    proc = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--raw", str(raw), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PIPELINE_ROOT": str(raw.parent)})
    assert proc.returncode == 2
    assert proc.stderr == (f"error: {raw / 'train.csv'}: row 17 (line 18), column pixel301: "
                           "value 256 is outside 0..255\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _crlf(text):
    return text.replace("\n", "\r\n")


def _quoted(text):
    lines = text.split("\n")
    return "\n".join([lines[0]] + [",".join(f'"{v}"' for v in ln.split(",")) if ln else ln for ln in lines[1:]])


ACCEPTED = {
    "crlf": _crlf,
    "bom": lambda t: "\ufeff" + t,
    "quoted": _quoted,
    "some_quoted": lambda t: set_cell(set_cell(t, 1, 0, '"0"'), 5, -1, '"' + t.split("\n")[5].split(",")[-1] + '"'),
    "no_final_newline": lambda t: t.rstrip("\n"),
    "all_at_once": lambda t: "\ufeff" + _crlf(_quoted(t)).rstrip("\r\n"),
}


@pytest.mark.parametrize("variant", sorted(ACCEPTED))
def test_accepted_variants_give_the_same_arrays(variant, prepared, tmp_path):
    raw, out, before = prepared
    alt_raw, alt_out = tmp_path / "alt_raw", tmp_path / "alt_out"
    change = ACCEPTED[variant]
    write_raw(alt_raw, change(GOOD_TRAIN), change(GOOD_TEST))
    assert (alt_raw / "train.csv").read_bytes() != GOOD_TRAIN.encode()
    assert run(alt_raw, alt_out) == 0
    for name in ("train.npz", "test.npz", "split.npz"):
        ref, got = load_npz(out / name), load_npz(alt_out / name)
        assert ref.keys() == got.keys()
        for key in ref:
            np.testing.assert_array_equal(got[key], ref[key])


def test_outputs_hold_the_csv_exactly(prepared):
    raw, out, _ = prepared
    train, test = load_npz(out / "train.npz"), load_npz(out / "test.npz")
    assert train["x"].shape == (N_TRAIN, 28, 28, 1) and train["x"].dtype == np.float32
    assert test["x"].shape == (N_TEST, 28, 28, 1) and test["x"].dtype == np.float32
    assert train["y"].dtype == np.int64
    np.testing.assert_array_equal(train["y"], TRAIN[:, 0])
    np.testing.assert_array_equal(np.round(train["x"].reshape(N_TRAIN, 784) * 255), TRAIN[:, 1:])
    np.testing.assert_array_equal(np.round(test["x"].reshape(N_TEST, 784) * 255), TEST)
    assert train["x"].min() == 0.0 and train["x"].max() == 1.0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["train_rows"] == N_TRAIN and meta["test_rows"] == N_TEST
    assert meta["class_counts"] == [3] * 10
    assert meta["n_train"] + meta["n_val"] == N_TRAIN
    assert meta["split_seed"] == 0 and meta["val_fraction"] == 0.1
    assert meta["train_sha256"] == hashlib.sha256((raw / "train.csv").read_bytes()).hexdigest()
    assert meta["test_sha256"] == hashlib.sha256((raw / "test.csv").read_bytes()).hexdigest()
    # meta.json is what the Makefile compares dates with: it must be the newest output
    assert all((out / "meta.json").stat().st_mtime_ns >= p.stat().st_mtime_ns for p in out.iterdir())


def test_split_is_stratified_and_seeded(tmp_path):
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(10), [20, 30, 40, 20, 30, 40, 20, 30, 40, 50])
    table = np.column_stack([labels, rng.integers(0, 256, size=(len(labels), 784))])
    raw = tmp_path / "raw"
    write_raw(raw, csv_text(TRAIN_HEADER, table))

    def split(seed, fraction="0.2", name=None):
        out = tmp_path / (name or f"out{seed}")
        assert run(raw, out, "--split-seed", str(seed), "--val-fraction", fraction) == 0
        return load_npz(out / "split.npz"), json.loads((out / "meta.json").read_text())

    first, meta = split(1)
    again, _ = split(1, name="again")
    other, _ = split(2)
    np.testing.assert_array_equal(first["val_idx"], again["val_idx"])
    assert not np.array_equal(first["val_idx"], other["val_idx"])
    train_idx, val_idx = first["train_idx"], first["val_idx"]
    assert np.intersect1d(train_idx, val_idx).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(len(labels)))
    np.testing.assert_array_equal(np.bincount(labels[val_idx]), np.round(np.bincount(labels) * 0.2))
    expected_train, expected_val = dataset.stratified_split(labels, 0.2, 1)
    np.testing.assert_array_equal(train_idx, expected_train)
    np.testing.assert_array_equal(val_idx, expected_val)
    assert meta["n_val"] == len(val_idx) and meta["val_fraction"] == 0.2 and meta["split_seed"] == 1
    assert meta["val_class_counts"] == np.bincount(labels[val_idx]).tolist()


# ---------------------------------------------------------------- misuse (issue 12)

def test_a_negative_label_is_outside_the_labels(prepared, capsys):
    raw, out, before = prepared
    write_raw(raw, set_cell(GOOD_TRAIN, 3, 0, "-1"))
    assert run(raw, out) == 2
    err = capsys.readouterr().err
    assert "row 3 (line 4), column label: value -1 is outside 0..9" in err and "0..255" not in err


def test_a_data_set_without_validation_rows_is_refused(prepared, capsys):
    raw, out, before = prepared
    write_raw(raw, csv_text(TRAIN_HEADER, TRAIN[:10]))  # one row of each digit: nothing left to validate on
    assert run(raw, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "validation split would be empty" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_huge_sparse_csv_is_refused_before_it_is_read(prepared, capsys):
    raw, out, before = prepared
    with open(raw / "test.csv", "wb") as fh:
        fh.write(TEST_HEADER.encode() + b"\n")
        fh.truncate(10 * 2**30)  # 10 GB of holes: reading it whole would exhaust memory
    assert run(raw, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "10.0 GB" in err and "`make fetch` replaces it" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "folder"])
def test_a_train_csv_that_is_no_file_is_one_line(prepared, capsys, kind):
    raw, out, before = prepared
    (raw / "train.csv").unlink()
    if kind == "fifo":
        os.mkfifo(raw / "train.csv")
    elif kind == "dev_zero":
        (raw / "train.csv").symlink_to("/dev/zero")
    else:
        (raw / "train.csv").mkdir()
    assert run(raw, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a regular file" in err and "`make fetch` replaces it" in err
    assert "missing" not in err


def test_a_test_csv_with_another_row_count_than_the_sample_submission_is_refused(prepared, capsys):
    raw, out, before = prepared
    sample = "ImageId,Label\n" + "".join(f"{i},0\n" for i in range(1, N_TEST + 1))
    (raw / "sample_submission.csv").write_text(sample)
    assert run(raw, out) == 0  # the counts agree
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_raw(raw, test=csv_text(TEST_HEADER, TEST[:-1]))  # a row lost in an edit
    assert run(raw, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"has {N_TEST - 1} rows but" in err and f"has {N_TEST}:" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_if_needed_compares_contents_and_the_split_not_dates(prepared, capsys):
    raw, out, before = prepared
    meta = out / "meta.json"
    stamp = meta.stat().st_mtime_ns
    capsys.readouterr()
    assert run(raw, out, "--if-needed") == 0 and run(raw, out, "--if-needed", "--val-fraction", "0.1") == 0
    assert "nothing to do" in capsys.readouterr().out and meta.stat().st_mtime_ns == stamp
    assert run(raw, out, "--if-needed", "--val-fraction", "0.3") == 0  # another split asked for
    assert json.loads(meta.read_text())["val_fraction"] == 0.3
    assert run(raw, out, "--if-needed") == 0 and json.loads(meta.read_text())["val_fraction"] == 0.3  # kept
    old = os.stat(raw / "test.csv")
    write_raw(raw, test=csv_text(TEST_HEADER, TEST[::-1]))  # new test.csv, unzipped with its old date
    os.utime(raw / "test.csv", ns=(old.st_atime_ns, old.st_mtime_ns))
    assert run(raw, out, "--if-needed") == 0
    assert json.loads(meta.read_text())["test_sha256"] == hashlib.sha256((raw / "test.csv").read_bytes()).hexdigest()
    assert json.loads(meta.read_text())["val_fraction"] == 0.3  # the split asked for before, on the new CSVs
    (out / "split.npz").unlink()  # an output lost: prepared again
    assert run(raw, out, "--if-needed") == 0 and (out / "split.npz").is_file()
    assert run(raw, out, "--split-seed", "3") == 0 and run(raw, out, "--if-needed") == 0
    assert json.loads(meta.read_text())["split_seed"] == 3  # `make train` keeps a split seed asked for by hand


def test_if_needed_on_a_fifo_says_what_is_wrong_instead_of_hashing_forever(prepared, capsys):
    raw, out, before = prepared
    (raw / "train.csv").unlink()
    os.mkfifo(raw / "train.csv")
    assert run(raw, out, "--if-needed") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "FIFO" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_test_npz_that_is_not_the_one_prepared_is_refused(prepared):
    # a test.npz copied or restored by hand with the same row count was predicted, and stamped as current
    from pipeline import dataset
    from pipeline.errors import UserError
    from pipeline.fileio import save_npz

    _, out, _ = prepared
    x = dataset.load_test_images(out)
    save_npz(out / "test.npz", {"x": x[::-1].copy()})  # the same images, another order
    with pytest.raises(UserError, match="other images than the test.csv meta.json names"):
        dataset.load_test_images(out)
