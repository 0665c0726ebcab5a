"""Ray Tune + Optuna search over the nine TLDR loss weights and the conditioning variants (or, with
--attack kkt, over the settings of the stationarity (KKT) reconstruction attack).

    python tune/search.py --dataset mnist-bundled --trials 8
    python tune/search.py --attack kkt --objective exposure_auc --trials 8 --steps 400
    python tune/search.py --dataset cifar10 --trials 200 --gpus-per-trial 0.25 --address auto ...

One classifier per search (trained or reused once, registered in MLflow as tldr-classifier-<dataset>);
every trial trains a generator against it with settings drawn by Optuna (TPE, seeded) from the search
space (tune/space.yaml; --space for your copy), behind a concurrency limit, with ASHA stopping weak
trials early on generator steps. Every trial is a nested MLflow run of the search's run; the best
finished generator is registered as tldr-generator-<dataset> and gets the alias `champion` only if it
beats the champion for the same classifier on the same objective. KKT trials optimise candidate
images instead (tune/kkt.yaml; the first trial is KKTConfig's defaults); their candidates are a run
artifact (kkt.pt), and nothing is registered: the registry holds generators only.

Interrupt with Ctrl-C and continue later with --resume. Open the results with `make ui`
(or python mlflow/serve.py).
"""
from __future__ import annotations

import argparse
import os
import sys

# before Ray is imported anywhere: no auth token, our own one line per trial instead of Ray's tables
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "30")

from tldr_core.attack.config import ConfigError  # noqa: E402
from tldr_core.attack.data import DATASETS  # noqa: E402
from tldr_core.platform import cli_flags as flags  # noqa: E402
from tldr_core.platform.search.settings import (ATTACKS, DEFAULT_OBJECTIVE, DEFAULT_STEPS,  # noqa: E402
                                                OBJECTIVE_CHOICES, SMOKE, SearchError, SearchSettings, make_settings)
from tldr_core.platform.tracking import store as tr  # noqa: E402 - light imports only until the checks pass

#: Errors printed as one line (exit code 2) instead of a traceback, by class name (no heavy imports).
ONE_LINE_ERRORS = {"DataError", "DatasetNotFoundError", "CheckpointError", "RegistryError", "MlflowException"}


def _data_options(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data and classifier")
    d.add_argument("--dataset", default="mnist-bundled",
                   help=f"data set: {', '.join(DATASETS)} (default mnist-bundled, embedded)")
    d.add_argument("--train-size", type=int, default=None,
                   help="classifier training-set size T (default 1000; 200 with --smoke-test)")
    flags.add_data_root(d)
    d.add_argument("--download", action="store_true", help="let torchvision download the data set if it is missing")
    flags.add_classifier(d, "train it once, or reuse the cached one, like the audit")


def _search_options(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("search")
    s.add_argument("--attack", choices=ATTACKS, default="tldr",
                   help="what every trial runs: tldr = train a conditioned generator (default); kkt = the "
                        "stationarity reconstruction attack (docs/method.md §8; its candidates are not registered)")
    s.add_argument("--trials", type=int, default=None, help="number of trials (default 8; 2 with --smoke-test)")
    s.add_argument("--steps", type=int, default=None,
                   help=f"generator (or KKT) steps per trial, the ASHA time axis (default {DEFAULT_STEPS}; "
                        f"{SMOKE['steps']} with --smoke-test)")
    s.add_argument("--objective", choices=OBJECTIVE_CHOICES, default=DEFAULT_OBJECTIVE,
                   help="what the search maximises (docs/method.md §6-7): quality = mean SSIM of each reconstruction "
                        "to its nearest training image; coverage = fraction of training images matched at SSIM >= "
                        "tau; gap = quality vs training minus quality vs size-matched held-out images; exposure = "
                        "exposure_tpr, the fraction of training images exposed at 1%% FPR (the number the verdict "
                        "reads); exposure_auc = AUC of training vs held-out exposure (smoother: better for small "
                        "searches, where the TPR often sits at 0). Label agreement is reported beside it. Default "
                        f"{DEFAULT_OBJECTIVE} (see docs/search.md)")
    s.add_argument("--space", default=None,
                   help="search-space YAML (default tune/space.yaml; tune/kkt.yaml with --attack kkt; copy and "
                        "edit it)")
    s.add_argument("--scheduler", choices=("asha", "fifo"), default="asha",
                   help="asha (default): stop weak trials early at steps/4, /2; fifo: run every trial to the end "
                        "(fair comparisons, benchmarks)")
    s.add_argument("--seed", type=int, default=0, help="seed of the Optuna sampler and of every trial (default 0)")
    s.add_argument("--per-class", type=int, default=None,
                   help="reconstructions per class scored at the end of a TLDR trial, and per baseline (default "
                        "20); a KKT trial scores all its candidates (KKTConfig.per_class, default 2 x the training "
                        "images per class; set it in the space)")
    s.add_argument("--tau", type=float, default=0.5, help="SSIM threshold of coverage (default 0.5)")
    s.add_argument("--smoke-test", action="store_true",
                   help=f"tiny search to check the set-up: {SMOKE['trials']} trials of {SMOKE['steps']} steps, "
                        f"T={SMOKE['train_size']} (explicit flags still win)")


def _run_options(p: argparse.ArgumentParser) -> None:
    flags.add_ray_flags(p.add_argument_group("resources and state (Ray)"))
    o = p.add_argument_group("results")
    flags.add_tracking_uri(o)
    o.add_argument("--experiment", default=None, help="MLflow experiment name (default tldr-<dataset>)")
    o.add_argument("--resume", nargs="?", const="latest", default=None, metavar="SEARCH_RUN_ID",
                   help="continue an interrupted search (default: the latest unfinished one of the experiment); "
                        "finished trials are kept, their MLflow runs are not duplicated")
    o.add_argument("--quiet", action="store_true", help="only the final summary")


def build_parser() -> argparse.ArgumentParser:
    p = flags.parser("python tune/search.py", __doc__)
    _data_options(p)
    _search_options(p)
    _run_options(p)
    return p


def settings_from_args(args: argparse.Namespace) -> SearchSettings:
    """The SearchSettings of a parsed command line (ConfigError / SearchError for a bad value)."""
    return make_settings(
        args.dataset, train_size=args.train_size, data_root=args.data_root, download=args.download,
        classifier=args.classifier, trials=args.trials, steps=args.steps, per_class=args.per_class,
        objective=args.objective, space=args.space, scheduler=args.scheduler, seed=args.seed, tau=args.tau,
        smoke_test=args.smoke_test, local=args.address is None, max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, storage=args.storage,
        tracking_uri=args.tracking_uri, experiment=args.experiment, attack=args.attack)


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 finished, 130 interrupted (continue with --resume), 2 a one-line error."""
    from tldr_core.platform.search.driver import SearchInterrupted, run

    args = build_parser().parse_args(argv)
    say = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    tr.quiet_mlflow_env()
    try:
        run(settings_from_args(args), say, address=args.address, resume=args.resume,
            report=lambda s: print(s, flush=True))
        return 0
    except SearchInterrupted:
        return 130  # run() said how to continue
    except KeyboardInterrupt as exc:
        print("\ninterrupted", file=sys.stderr)
        run_id = getattr(exc, "search_run_id", None)
        if run_id:
            print(f"continue with:  {flags.command_name('python tune/search.py')} --resume {run_id}", file=sys.stderr)
        return 130
    except (SearchError, ConfigError, tr.TrackingError) as exc:
        return flags.print_error(exc)
    except Exception as exc:  # noqa: BLE001 - data/registry/checkpoint errors: one line, not a traceback
        if type(exc).__name__ in ONE_LINE_ERRORS:
            return flags.print_error(exc)
        raise


if __name__ == "__main__":
    sys.exit(main())
