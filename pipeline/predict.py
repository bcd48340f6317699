"""Class probabilities of a trained run on the test set: runs/NAME/test_probs.npz.

    python -m pipeline.predict --run NAME [--device auto|cpu|gpu] [--batch-size 1000]

The probabilities carry what they were made from (the data and the model, pipeline.runs): when both
are as they are now, there is nothing to do; otherwise they are computed again. For an ensemble run the
prediction is the blend chosen by validation (pipeline.ensemble).
"""
import sys
import time

import numpy as np

from pipeline import dataset, runs
from pipeline.dataset import load_test_images
from pipeline.errors import StageArgumentParser, UserError, cli_main
from pipeline.runs import TEST_PROBS


def parse_args(argv):
    p = StageArgumentParser(prog="python -m pipeline.predict", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run name under runs/")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--batch-size", type=int, default=1000, help="images per forward pass")
    p.add_argument("--tta", type=int, choices=[0, 1], default=None,
                   help="an ensemble's blend tries test-time shifts (1) or not (0); default: as its last blend")
    return p.parse_args(argv)


def tta_tried(run):
    """Whether the run's last blend tried test-time shifts (`make ensemble TTA=1`): a blend made again because
    its members or the data changed tries them again, rather than dropping them unasked."""
    try:
        report = run.ensemble_report() or {}
    except UserError:  # damaged: the blend is made again from scratch, as `make ensemble` would
        return False
    candidates = report.get("candidates")
    return isinstance(candidates, list) and any(isinstance(c, dict) and c.get("tta") is True for c in candidates)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    from pipeline.nn import configure_threads, select_device

    configure_threads()  # as training ran: the engine's threads, NumPy's BLAS held to one

    run = runs.Run.existing(args.run)
    if run.is_ensemble:  # its prediction is the blend chosen by validation
        from pipeline import ensemble

        with run.lock("ensemble"):
            made_from = run.made_from()
            n_test = dataset.load_meta().get("test_rows")
            tried = tta_tried(run)
            tta = tried if args.tta is None else bool(args.tta)
            if isinstance(n_test, int) and run.cached_probs(TEST_PROBS, n_test, made_from) is not None \
                    and tta == tried:
                # the blend of now, as `make ensemble` chose it (with TTA=1 perhaps): not redone without it
                print(f"{run.folder / TEST_PROBS} is up to date (same blend, same members, same test data)")
                return 0
            report = ensemble.build(run.folder, select_device(args.device), tta=tta)
        print(f"{run.folder / TEST_PROBS}: {report['strategy']} of {len(report['weights'])} members, "
              f"validation estimate {report['estimate']['accuracy']:.5f}")
        return 0
    if args.tta:
        raise UserError(f"TTA=1 tries test-time shifts when an ensemble's members are blended; runs/{run.name} is a "
                        f"single net: leave TTA out")
    with run.lock("predict", shared=True):
        made_from = run.made_from()  # before the images are read: prepare is not locked out meanwhile
        x = load_test_images()
        if run.cached_probs(TEST_PROBS, len(x), made_from) is not None:
            print(f"{run.folder / TEST_PROBS} is up to date (same model, same test data)")
            return 0
        xp = select_device(args.device)
        start = time.perf_counter()
        probs = run.predict_probs(x, xp=xp, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        path = run.write_probs(probs, made_from=made_from)
    counts = np.bincount(probs.argmax(axis=1), minlength=dataset.NUM_CLASSES)
    print(f"{path}: {len(probs)} test images in {seconds:.1f} s on {xp.__name__}; "
          f"predicted per class: {' '.join(str(int(c)) for c in counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
