"""Selection by validation: blends compared like for like on rows every member held out; an estimate no choice saw."""
import json
import os
import subprocess
import sys
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest

from pipeline import ensemble, runs
from pipeline.config import TrainConfig, to_toml
from pipeline.errors import UserError
from pipeline.fileio import save_npz

REPO = Path(__file__).resolve().parent.parent


def onehot(labels, conf=0.9):
    p = np.full((len(labels), 10), (1 - conf) / 9, np.float32)
    p[np.arange(len(labels)), labels] = conf
    return p


def test_shared_holdout_keeps_the_rows_every_member_held_out_and_aligns_them():
    y = np.arange(10) % 10
    a = np.array([0, 1, 2, 3, 4, 5])
    b = np.array([5, 3, 1, 7, 8])  # another order, and rows 7, 8 that member 0 trained on
    rows, labels, P = ensemble.shared_holdout([(a, y[a], onehot(y[a])), (b, y[b], onehot((y[b] + 1) % 10))],
                                               min_rows=3)
    assert list(rows) == [1, 3, 5] and list(labels) == [1, 3, 5]
    assert list(P[0].argmax(1)) == [1, 3, 5] and list(P[1].argmax(1)) == [2, 4, 6]


def test_members_on_different_splits_are_refused_in_one_line():
    y = np.arange(40) % 10
    with pytest.raises(UserError, match="share only 0 validation rows"):
        ensemble.shared_holdout([(np.arange(20), y[:20], onehot(y[:20])), (np.arange(20, 40), y[20:], onehot(y[20:]))])


def test_members_of_one_split_too_small_to_choose_on_are_told_so():
    # VAL_FRACTION=0.0003: the members of one split were told they came from different splits
    y, rows = np.arange(40) % 10, np.arange(10)
    with pytest.raises(UserError, match="validation split holds only 10 rows, and choosing a blend needs at least 20"):
        ensemble.shared_holdout([(rows, y[rows], onehot(y[rows]))] * 2)


def test_the_estimate_comes_from_the_half_that_took_no_part_in_the_choice():
    n = 400
    y = np.arange(n) % 10
    pick, rest = ensemble.split_halves(n)
    assert len(np.intersect1d(pick, rest)) == 0 and len(pick) + len(rest) == n
    # Member 0 is perfect on the choice half and wrong on the other; member 1 is confidently wrong on 30 % of
    # the rows, so the mean of the two follows it there and member 0 alone wins the choice half by far.
    lucky = onehot(y, conf=0.9)
    lucky[rest] = onehot((y[rest] + 1) % 10)
    steady = onehot(np.where(np.arange(n) % 10 < 3, (y + 2) % 10, y), conf=0.99)
    name, weights, picked, estimate, _ = ensemble.select_blend(np.stack([lucky, steady]), y)
    assert name == "best single" and list(weights) == [1, 0] and picked["accuracy"] == 1.0
    assert estimate["accuracy"] == 0.0 and estimate["rows"] == len(rest)  # the honest figure


def test_a_lead_of_a_few_rows_does_not_displace_the_mean_of_all():
    # Five members with the same 20 errors in 2000 rows; member 0 alone also gets 3 of them right. On the
    # choice rows it beats the mean by those rows at most: chance, not a better model.
    n = 2000
    y = np.arange(n) % 10
    wrong = np.zeros(n, bool)
    wrong[::100] = True
    P = np.stack([onehot(np.where(wrong, (y + 1) % 10, y), conf=0.8) for _ in range(5)])
    P[0, np.flatnonzero(wrong)[:3]] = onehot(y[np.flatnonzero(wrong)[:3]], conf=0.8)
    (name, weights, score), cands = ensemble.choose(P, y)
    best_single = next(c for c in cands if c[0] == "best single")
    assert best_single[2]["accuracy"] > score["accuracy"] and best_single[2]["p"] > 0.05
    assert name == "mean of all" and list(weights) == [1] * 5 and score["p"] == 1.0


@pytest.mark.parametrize("wins, losses, p", [(0, 0, 1.0), (5, 0, 1 / 32), (0, 3, 1.0), (2, 1, 0.5), (3, 1, 5 / 16)])
def test_mcnemar_p_counts_only_the_rows_where_the_two_disagree(wins, losses, p):
    agree = 7  # rows both get right or both get wrong change nothing
    right = np.array([True] * wins + [False] * losses + [True] * agree + [False] * agree)
    reference = np.array([False] * wins + [True] * losses + [True] * agree + [False] * agree)
    assert ensemble.mcnemar_p(right, reference) == pytest.approx(p)


def test_mcnemar_p_stays_exact_where_floats_would_overflow():
    # a collapsed member disagrees with the mean of all on most of 2 000 choice rows: comb(n, j) > 1e308
    right = np.array([False] * 1500 + [True] * 500)
    assert 0.0 <= ensemble.mcnemar_p(right, ~right) <= 1.0 and ensemble.mcnemar_p(~right, right) < 1e-100


def test_best_single_topk_and_greedy_choices():
    rng = np.random.default_rng(0)
    n, k = 400, 4
    y = rng.integers(0, 10, n)
    P = np.empty((k, n, 10), np.float32)
    # Members 0..2 make independent errors on 20 % of rows; member 3 is noise.
    for i in range(3):
        wrong = rng.random(n) < 0.2
        P[i] = onehot(np.where(wrong, (y + 1 + i) % 10, y), conf=0.6)
    P[3] = onehot(rng.integers(0, 10, n), conf=0.9)
    (name, weights, est), cands = ensemble.choose(P, y)
    singles = [ensemble.blend_score(np.eye(k)[i], P, y)["accuracy"] for i in range(k)]
    assert cands[0][0] == "best single" and cands[0][2]["accuracy"] == max(singles)
    assert weights[3] == 0, "the noise member must not be chosen"
    assert est["accuracy"] > max(singles), "three independent 80 % members blend above each of them"
    assert est["accuracy"] == max(c[2]["accuracy"] for c in cands)
    # every candidate is judged on the same rows, by all of its members
    assert {c[2]["rows"] for c in cands} == {n}


def test_a_single_clearly_best_member_is_chosen_alone():
    y = np.arange(500) % 10
    P = np.stack([onehot(y, 0.99), onehot((y + 1) % 10, 0.99), onehot((y + 2) % 10, 0.99)])
    (name, weights, est), _ = ensemble.choose(P, y)
    assert name == "best single" and list(weights) == [1, 0, 0] and est["accuracy"] == 1.0


def test_shift_images_moves_by_whole_pixels():
    x = np.zeros((1, 28, 28, 1), np.float32)
    x[0, 5, 7] = 1
    assert ensemble.shift_images(x, 1, -2)[0, 6, 5, 0] == 1
    assert ensemble.shift_images(x, 0, 0).sum() == 1


def write_member(folder, idx, y, probs, test_probs, finished=True):
    """A member run: validation predictions; when finished, its config, metrics, a real model and a test cache
    made from the data and model of now."""
    from pipeline.nn import build_model

    folder.mkdir(parents=True)
    save_npz(folder / "val_predictions.npz", {"idx": idx, "y": y, "probs": probs})
    if finished:
        (folder / "config.toml").write_text(to_toml(TrainConfig(arch="seed_small").to_dict()))
        (folder / "metrics.jsonl").write_text('{"epoch": 1}\n')
        save_npz(folder / "model.npz", build_model("seed_small", seed=0, dtype=np.float32).state_dict())
        (folder / "summary.json").write_text(json.dumps({"best_val_acc": 1.0, "finished": True}))
        runs.run_of(folder).write_probs(test_probs)


def blend_project(tmp_path, monkeypatch, n=40, m=12):
    """data/processed of n training rows and m test rows, runs/ens with members 0 and 1 finished, 2 not."""
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    y = np.arange(n) % 10
    x = np.zeros((n, 28, 28, 1), np.float32)
    save_npz(tmp_path / "data/processed/train.npz", {"x": x, "y": y})
    save_npz(tmp_path / "data/processed/test.npz", {"x": np.zeros((m, 28, 28, 1), np.float32)})
    (tmp_path / "data/processed/meta.json").write_text(json.dumps({"test_rows": m}))
    run = tmp_path / "runs" / "ens"
    held = np.arange(0, n, 2)  # every member holds out the same rows
    test_labels = np.arange(m) % 10
    for k in range(2):
        write_member(run / "members" / str(k), held, y[held], onehot(y[held]), onehot(test_labels))
    write_member(run / "members" / "2", held, y[held], onehot(y[held]), onehot(test_labels), finished=False)
    return run, test_labels


def test_build_blends_finished_members_and_skips_unfinished(tmp_path, monkeypatch):
    run, test_labels = blend_project(tmp_path, monkeypatch)
    with pytest.warns(UserWarning, match="unfinished members 2"):
        report = ensemble.build(run)
    assert report["members"] == ["0", "1"] and report["skipped"] == ["2"]
    probs = np.load(run / "test_probs.npz")["probs"]
    assert probs.shape == (12, 10) and list(probs.argmax(1)) == list(test_labels)  # the caches were used
    blend = json.loads((run / "ensemble.json").read_text())
    assert blend["estimate"] == {"accuracy": 1.0, "log_loss": pytest.approx(-np.log(0.9)), "rows": 10}


@pytest.mark.parametrize("fixes, kept", [(3, False), (12, True)])
def test_test_time_shifts_are_kept_only_when_they_beat_the_plain_blend_beyond_chance(tmp_path, monkeypatch,
                                                                                    fixes, kept):
    run, _ = blend_project(tmp_path, monkeypatch, n=800)
    held = np.arange(0, 800, 2)
    y = held % 10
    wrong = np.arange(len(held)) % 4 == 0  # the plain members miss a quarter of the rows
    pick, _ = ensemble.split_halves(len(held))
    fixed = np.zeros(len(held), bool)
    fixed[pick[wrong[pick]][:fixes]] = True  # the shifts right `fixes` of them on the choice half, no more

    def outputs(member, x_train, x_test, xp, tta, data=None):
        miss = wrong & ~fixed if tta else wrong
        return held, y, onehot(np.where(miss, (y + 1) % 10, y)), onehot(np.arange(12) % 10)

    monkeypatch.setattr(ensemble, "member_outputs", outputs)
    with pytest.warns(UserWarning):
        report = ensemble.build(run, tta=True)
    plain, shifted = (next(c for c in report["candidates"] if c["tta"] is t and c["strategy"] == "mean of all")
                      for t in (False, True))
    assert shifted["accuracy"] == pytest.approx(plain["accuracy"] + fixes / len(pick))  # ahead either way
    assert report["tta"] is kept


def test_members_trained_on_different_train_csv_files_are_refused_in_one_line(tmp_path, monkeypatch):
    # `make fetch SOURCE=kaggle` between members: the blend was judged on member 0's labels and dropped the rest
    run, _ = blend_project(tmp_path, monkeypatch)
    for k, sha in (("0", "a" * 64), ("1", "b" * 64)):
        summary = run / "members" / k / "summary.json"
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "train_sha256": sha}))
    with pytest.warns(UserWarning), pytest.raises(UserError, match="different train.csv files .*members 0 on aaaa"):
        ensemble.build(run)
    assert not (run / "ensemble.json").exists()
    meta = tmp_path / "data/processed/meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "train_sha256": "a" * 64}))
    with pytest.warns(UserWarning), pytest.raises(UserError, match=r"remove \S*runs/ens/members/1 \(learnt on another"):
        ensemble.build(run)  # the advice names the member to train again on the prepared train.csv


def test_members_from_before_summaries_named_train_csv_are_checked_by_their_labels(tmp_path, monkeypatch):
    run, _ = blend_project(tmp_path, monkeypatch)
    held = np.arange(0, 40, 2)
    other = (held % 10 + 3) % 10
    save_npz(run / "members/1/val_predictions.npz", {"idx": held, "y": other, "probs": onehot(other)})
    with pytest.warns(UserWarning), pytest.raises(UserError, match="disagree on the labels"):
        ensemble.build(run)


def test_test_time_shifts_on_a_train_csv_changed_since_the_members_are_refused(tmp_path, monkeypatch):
    run, _ = blend_project(tmp_path, monkeypatch)
    y_now = (np.arange(40) % 10 + 1) % 10  # another train.csv of the same length: its images answer other labels
    save_npz(tmp_path / "data/processed/train.npz", {"x": np.zeros((40, 28, 28, 1), np.float32), "y": y_now})
    passes = []
    real = ensemble.member_outputs
    monkeypatch.setattr(ensemble, "member_outputs", lambda *a, **k: passes.append(a[4]) or real(*a, **k))
    with pytest.warns(UserWarning), pytest.raises(UserError, match="test-time shifts"):
        ensemble.build(run, tta=True)
    assert passes == [False, False]  # refused before the shifted passes, the longest
    with pytest.warns(UserWarning):
        ensemble.build(run)  # without shifts the members' own validation rows and labels still judge them


def test_member_caches_of_other_test_data_are_recomputed(tmp_path, monkeypatch):
    run, test_labels = blend_project(tmp_path, monkeypatch)
    # prepare ran again on another test.csv of the same length: every cache is stale
    x_new = np.random.default_rng(1).random((12, 28, 28, 1), dtype=np.float32)
    save_npz(tmp_path / "data/processed/test.npz", {"x": x_new})
    (tmp_path / "data/processed/meta.json").write_text(json.dumps({"test_rows": 12, "test_sha256": "other"}))
    with pytest.warns(UserWarning):
        ensemble.build(run)
    model = runs.Run("ens/members/0").load_model()
    fresh = np.load(run / "members" / "0" / "test_probs.npz")["probs"]
    np.testing.assert_allclose(fresh, model.predict_proba(x_new), rtol=1e-5, atol=1e-6)
    assert runs.Run("ens").cached_probs("test_probs.npz", 12) is not None  # the blend names the data of now


def test_a_member_cache_with_the_wrong_row_count_is_recomputed(tmp_path, monkeypatch):
    run, _ = blend_project(tmp_path, monkeypatch)
    member = runs.Run("ens/members/1")
    member.write_probs(np.full((5, 10), 0.1, np.float32))  # made from the data of now, but 5 rows where 12 are
    with pytest.warns(UserWarning):
        ensemble.build(run)
    assert np.load(run / "members" / "1" / "test_probs.npz")["probs"].shape == (12, 10)


def test_cli_warns_about_unfinished_members_in_one_line(tmp_path, monkeypatch):
    blend_project(tmp_path, monkeypatch)
    env = dict(os.environ, PIPELINE_ROOT=str(tmp_path), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "pipeline.ensemble", "--run", "ens", "--device", "cpu"], env=env,
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "warning: runs/ens: skipping unfinished members 2\n"


def test_predict_and_ensemble_do_not_import_each_other():
    for module, other in (("pipeline.predict", "pipeline.ensemble"), ("pipeline.ensemble", "pipeline.predict")):
        r = subprocess.run([sys.executable, "-c", f"import sys, {module}; print({other!r} in sys.modules)"],
                           cwd=REPO, capture_output=True, text=True)
        assert r.stdout.strip() == "False", (module, r.stderr)


def test_cli_on_a_run_without_members_is_one_line_exit_2(tmp_path):
    (tmp_path / "runs" / "single").mkdir(parents=True)
    env = dict(os.environ, PIPELINE_ROOT=str(tmp_path), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "pipeline.ensemble", "--run", "single"], env=env, cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "members" in r.stderr


def test_ensemble_preset_trains_members_with_their_own_seeds_then_predict_blends(tmp_path):
    from tests.test_resume import write_processed

    write_processed(tmp_path, n=120)
    env = dict(os.environ, PIPELINE_ROOT=str(tmp_path), PYTHONPATH=str(REPO))

    def run(*args):
        r = subprocess.run([sys.executable, "-m", *args], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    run("pipeline.train", "--preset", "overnight", "--run", "ens", "MEMBERS=2", "EPOCHS=1", "ARCH=seed_small",
        "MEMBER_ARCHS=",
        "BATCH_SIZE=16", "AUGMENT=0", "DEVICE=cpu")
    members = tmp_path / "runs" / "ens" / "members"
    vals = [np.load(members / k / "val_predictions.npz")["idx"] for k in ("0", "1")]
    assert np.array_equal(vals[0], vals[1]), "every member holds out the prepared validation rows"
    configs = [tomllib.loads((members / k / "config.toml").read_text()) for k in ("0", "1")]
    assert [c["seed"] for c in configs] == [0, 1] and configs[0]["split_seed"] == configs[1]["split_seed"]
    assert json.loads((tmp_path / "runs" / "ens" / "summary.json").read_text())["members"] == 2

    out = run("pipeline.predict", "--run", "ens", "--device", "cpu")
    assert "validation estimate" in out
    report = json.loads((tmp_path / "runs" / "ens" / "ensemble.json").read_text())
    assert report["members"] == ["0", "1"]
    assert np.load(tmp_path / "runs" / "ens" / "test_probs.npz")["probs"].shape == (20, 10)


def test_members_take_the_architectures_of_member_archs_in_turn_and_blend(tmp_path):
    from pipeline import train
    from tests.test_resume import write_processed

    cfg = TrainConfig(arch="deotte", members=3, member_archs="deotte_relu_bn, deotte")
    assert [train.member_config(cfg, k).arch for k in range(3)] == ["deotte_relu_bn", "deotte", "deotte_relu_bn"]
    assert train.member_config(TrainConfig(arch="lenet5", members=2), 1).arch == "lenet5"  # "": every member ARCH
    write_processed(tmp_path, n=120)
    env = dict(os.environ, PIPELINE_ROOT=str(tmp_path), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "pipeline.train", "--preset", "overnight", "--run", "mix", "MEMBERS=2",
                        "EPOCHS=1", "ARCH=seed_small", "MEMBER_ARCHS=seed_small,lenet5", "BATCH_SIZE=16", "AUGMENT=0",
                        "DEVICE=cpu"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    members = tmp_path / "runs" / "mix" / "members"
    assert [tomllib.loads((members / k / "config.toml").read_text())["arch"] for k in "01"] == ["seed_small", "lenet5"]
    assert json.loads((tmp_path / "runs" / "mix" / "summary.json").read_text())["arch"] == "seed_small+lenet5"
    r = subprocess.run([sys.executable, "-m", "pipeline.ensemble", "--run", "mix", "--device", "cpu"], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for bad, words in ((["MEMBERS=2", "ARCH=seed_small", "MEMBER_ARCHS=seed_small,nope"], "unknown architecture 'nope'"),
                       (["MEMBERS=2", "MEMBER_ARCHS=seed_small,lenet5", "ARCH=lenet5"], "not the first of MEMBER_ARCHS"),
                       (["MEMBER_ARCHS=seed_small,lenet5"], "needs MEMBERS of 2 or more"),
                       (["MEMBERS=2", "ARCH=seed_small", "MEMBER_ARCHS=seed_small,lenet5,"], "separated by commas")):
        r = subprocess.run([sys.executable, "-m", "pipeline.train", "--preset", "quick", "--run", "bad", *bad,
                            "EPOCHS=1", "DEVICE=cpu"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
        assert not (tmp_path / "runs" / "bad").exists()


def test_the_lab_curve_blends_the_first_k_members_and_scores_them_on_the_key(tmp_path, monkeypatch):
    from bench import ensemble_curve
    run, test_labels = blend_project(tmp_path, monkeypatch)
    key = tmp_path / "key.csv"
    truth = test_labels.copy()
    truth[:3] = (truth[:3] + 1) % 10  # the members are wrong on 3 of the 12 test rows
    key.write_text("ImageId,Label,mnist_test\n" + "".join(f"{i + 1},{t},1\n" for i, t in enumerate(truth)))
    with pytest.warns(UserWarning, match="unfinished members 2"):
        rows, skipped = ensemble_curve.curve("ens", key)
    assert skipped == ["2"] and [r["k"] for r in rows] == [1, 2]
    assert {r["member_hidden"] for r in rows} == {r["chosen_hidden"] for r in rows} == {0.75}
    assert [r["chosen"] for r in rows] == ["best single", "mean of all"]


def test_the_lab_extrapolation_recovers_a_curve_of_the_form_a_plus_b_over_k():
    from bench import ensemble_curve
    rows = [{"k": k, "mean_hidden": 1 - (0.003 + 0.0012 / k)} for k in range(1, 7)]
    a, b, acc = ensemble_curve.extrapolate(rows)
    assert a == pytest.approx(0.003) and b == pytest.approx(0.0012)
    assert acc[8] == pytest.approx(1 - 0.003 - 0.0012 / 8) and acc[15] == pytest.approx(1 - 0.003 - 0.00008)


@pytest.mark.parametrize("change", ["retrained", "deleted", "finished since", "repaired since", "started since"])
def test_a_blend_whose_members_changed_is_never_submitted(tmp_path, monkeypatch, change):
    # ensemble.json names its members but not their weights: a member retrained, deleted or finished after the
    # blend left test_probs.npz looking fresh, and `make submit` uploaded the old blend
    from pipeline import submit
    from pipeline.errors import UserError
    from pipeline.nn import build_model

    run, _ = blend_project(tmp_path, monkeypatch)
    model = build_model("seed_small", seed=2, dtype=np.float32).state_dict()
    if change == "repaired since":  # killed after model.npz, before summary.json: skipped by the blend
        save_npz(run / "members/2/model.npz", model)
    with pytest.warns(UserWarning, match="unfinished members 2"):
        ensemble.build(run)
    assert runs.Run("ens").test_probs(12).shape == (12, 10)  # as blended: accepted
    if change == "retrained":
        save_npz(run / "members/1/model.npz", build_model("seed_small", seed=1, dtype=np.float32).state_dict())
    elif change == "deleted":
        shutil.rmtree(run / "members/0")
    elif change == "finished since":  # member 2 delivers: the blend would now include it
        shutil.rmtree(run / "members/2")
        held = np.arange(0, 40, 2)
        write_member(run / "members/2", held, held % 10, onehot(held % 10), onehot(np.arange(12) % 10))
        assert runs.Run("ens/members/2").finished
    elif change == "repaired since":  # `make train` repairs it with the very same model bytes: the blend must grow
        finished = tmp_path / "done"
        write_member(finished, np.arange(0, 40, 2), np.arange(0, 40, 2) % 10, onehot(np.arange(0, 40, 2) % 10),
                     onehot(np.arange(12) % 10))
        for name in ("config.toml", "metrics.jsonl", "summary.json"):
            shutil.copy(finished / name, run / "members/2" / name)
        save_npz(run / "members/2/model.npz", model)
        assert runs.Run("ens/members/2").finished
    else:  # a member that only started training since changes nothing the blend used
        (run / "members/3/checkpoints").mkdir(parents=True)
        assert runs.Run("ens").test_probs(12).shape == (12, 10)
        return
    with pytest.raises(UserError, match="made from another model"):
        runs.Run("ens").test_probs(12)
    assert submit.main(["--run", "ens", "--upload", "0"]) == 2
    assert not (tmp_path / "submissions" / "submission.csv").exists()


def test_predict_keeps_a_blend_that_is_up_to_date_and_tries_shifts_again_when_it_is_not(tmp_path, monkeypatch,
                                                                                         capsys):
    # `make ensemble TTA=1` then `make train submit`: predict blended again without the shifts, unasked
    from pipeline import predict
    from pipeline.nn import build_model

    run, _ = blend_project(tmp_path, monkeypatch)
    with pytest.warns(UserWarning, match="unfinished members 2"):
        ensemble.build(run, tta=True)
    before = (run / "ensemble.json").read_bytes()
    assert predict.main(["--run", "ens", "--device", "cpu"]) == 0
    assert (run / "ensemble.json").read_bytes() == before  # up to date: kept as it was chosen
    assert "is up to date" in capsys.readouterr().out
    save_npz(run / "members/1/model.npz", build_model("seed_small", seed=1, dtype=np.float32).state_dict())
    assert predict.main(["--run", "ens", "--device", "cpu"]) == 0  # (its warning goes to stderr, in one line)
    assert "is up to date" not in capsys.readouterr().out  # blended again, for the new member model
    blend = json.loads((run / "ensemble.json").read_text())
    assert any(c["tta"] for c in blend["candidates"])  # the shifts were tried again
    assert runs.Run("ens").test_probs(12).shape == (12, 10)
    # TTA= given to predict (`make submit RUN=ens TTA=0`) was ignored: the blend of the last `make ensemble` kept
    tried = lambda: any(c["tta"] for c in json.loads((run / "ensemble.json").read_text())["candidates"])
    for asked, kept in ((0, False), (0, True), (1, False)):  # blended again whenever TTA differs from the last
        capsys.readouterr()
        assert predict.main(["--run", "ens", "--device", "cpu", "--tta", str(asked)]) == 0
        assert tried() is bool(asked)
        assert ("is up to date" in capsys.readouterr().out) is kept
    assert runs.Run("ens").test_probs(12).shape == (12, 10)


def test_blending_a_member_names_its_ensemble(tmp_path, monkeypatch, capsys):
    # `make ensemble RUN=ens/members/1` advised `make train ... RUN=ens/members/1`, which train refuses
    blend_project(tmp_path, monkeypatch)
    assert ensemble.main(["--run", "ens/members/1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "make ensemble RUN=ens`" in err, err
