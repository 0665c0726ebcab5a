"""Ray Tune + Optuna search over the nine TLDR loss weights and the conditioning variants.

    python tune/search.py --dataset mnist-bundled --trials 8
    python tune/search.py --dataset cifar10 --trials 200 --gpus-per-trial 0.25 --address auto ...

One classifier per search (trained or reused once, registered in MLflow as tldr-classifier-<dataset>);
every trial trains a generator against it with settings drawn by Optuna (TPE, seeded) from the search
space (tune/space.yaml; --space for your copy), behind a concurrency limit, with ASHA stopping weak
trials early on generator steps. Every trial is a nested MLflow run of the search's run; the best
finished generator is registered as tldr-generator-<dataset> and gets the alias `champion` only if it
beats the champion for the same classifier on the same objective.

Interrupt with Ctrl-C and continue later with --resume. Open the results with `make ui`
(or python mlflow/serve.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run by path: make the repository's tldr_core importable
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")      # our own one line per trial instead of Ray's tables
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "30")

from tldr_core.platform import tracking as tr  # noqa: E402 - light imports only until the checks pass
from tldr_core.attack.config import ConfigError  # noqa: E402
from tldr_core.attack.data import DATASETS  # noqa: E402

OBJECTIVES = ("quality", "coverage", "gap")
DEFAULT_OBJECTIVE = "quality"
DEFAULT_STEPS = 400
SMOKE = {"trials": 2, "steps": 20, "per_class": 4, "train_size": 200, "classifier_epochs": 2}


def log_every_for(eval_every: int) -> int:
    """The largest divisor of eval_every that is <= 25 (losses are logged on that grid)."""
    for d in range(min(25, eval_every), 0, -1):
        if eval_every % d == 0:
            return d
    return 1


class SearchError(RuntimeError):
    """A problem found before (or instead of) running the search; printed as one line."""


@dataclass
class SearchSettings:
    """Everything that defines a search; stored on its MLflow run so --resume can continue it."""

    dataset: str
    train_size: int
    data_root: str | None
    download: bool
    trials: int
    max_concurrent: int
    cpus_per_trial: float
    gpus_per_trial: float
    steps: int
    eval_every: int
    log_every: int
    per_class: int
    eval_per_class: int
    tau: float
    objective: str
    seed: int
    experiment: str
    tracking_uri: str
    storage: str
    search_name: str
    classifier: str | None
    classifier_epochs: int
    space: dict[str, Any]
    space_source: str
    smoke_test: bool
    scheduler: str = "asha"


# ----------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tune/search.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data and classifier")
    d.add_argument("--dataset", default="mnist-bundled",
                   help=f"data set: {', '.join(DATASETS)} (default mnist-bundled, embedded)")
    d.add_argument("--train-size", type=int, default=None,
                   help="classifier training-set size T (default 1000; 200 with --smoke-test)")
    d.add_argument("--data-root", default=None,
                   help="folder holding the data set (torchvision layout or image folder); passed to load_dataset")
    d.add_argument("--download", action="store_true", help="let torchvision download the data set if it is missing")
    d.add_argument("--classifier", default=None,
                   help="the classifier to audit: a tldr checkpoint file, or a registry URI such as "
                        "models:/tldr-classifier-mnist-bundled@champion or models:/NAME/VERSION "
                        "(default: train it once, or reuse the cached one, like python -m tldr_core.cli.audit)")
    s = p.add_argument_group("search")
    s.add_argument("--trials", type=int, default=None, help="number of trials (default 8; 2 with --smoke-test)")
    s.add_argument("--steps", type=int, default=None,
                   help=f"generator steps per trial, the ASHA time axis (default {DEFAULT_STEPS}; "
                        f"{SMOKE['steps']} with --smoke-test)")
    s.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                   help="what the search maximises (method.md §6): quality = mean SSIM of each reconstruction to "
                        "its nearest training image; coverage = fraction of training images matched at SSIM >= tau; "
                        "gap = quality vs training minus quality vs size-matched held-out images. Label agreement "
                        f"is reported beside it. Default {DEFAULT_OBJECTIVE} (see docs/search.md)")
    s.add_argument("--space", default=None,
                   help="search-space YAML (default tune/space.yaml; copy and edit it)")
    s.add_argument("--scheduler", choices=("asha", "fifo"), default="asha",
                   help="asha (default): stop weak trials early at steps/4, /2; fifo: run every trial to the end "
                        "(fair comparisons, benchmarks)")
    s.add_argument("--seed", type=int, default=0, help="seed of the Optuna sampler and of every trial (default 0)")
    s.add_argument("--per-class", type=int, default=None,
                   help="reconstructions per class scored at the end of a trial (default 20)")
    s.add_argument("--tau", type=float, default=0.5, help="SSIM threshold of coverage (default 0.5)")
    s.add_argument("--smoke-test", action="store_true",
                   help=f"tiny search to check the set-up: {SMOKE['trials']} trials of {SMOKE['steps']} steps, "
                        f"T={SMOKE['train_size']} (explicit flags still win)")
    r = p.add_argument_group("resources (Ray)")
    r.add_argument("--address", default=None,
                   help="a running Ray cluster (host:port, ray://host:port or auto); default: start a local Ray "
                        "with this machine's cores")
    r.add_argument("--max-concurrent", type=int, default=None,
                   help="trials running at once (default: as many as the resources allow locally, 8 on a cluster)")
    r.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    r.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPUs per trial, fractional allowed (0.25 packs four trials on a GPU; default 0)")
    o = p.add_argument_group("results")
    o.add_argument("--storage", default=None,
                   help="where Ray Tune keeps the search state: a local folder or s3://bucket/prefix "
                        "(default runs/tune in this repository)")
    o.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI, e.g. http://127.0.0.1:5000 (default: $MLFLOW_TRACKING_URI, else "
                        "sqlite:///<repo>/runs/mlflow.db)")
    o.add_argument("--experiment", default=None, help="MLflow experiment name (default tldr-<dataset>)")
    o.add_argument("--resume", nargs="?", const="latest", default=None, metavar="SEARCH_RUN_ID",
                   help="continue an interrupted search (default: the latest unfinished one of the experiment); "
                        "finished trials are kept, their MLflow runs are not duplicated")
    o.add_argument("--quiet", action="store_true", help="only the final summary")
    return p


def _settings_from_args(args: argparse.Namespace) -> SearchSettings:
    from tldr_core.platform.search_space import DEFAULT_SPACE, load_space

    smoke = args.smoke_test
    if args.dataset not in DATASETS:
        raise SearchError(f"unknown data set {args.dataset!r}; choose one of: {', '.join(DATASETS)}")
    trials = args.trials if args.trials is not None else (SMOKE["trials"] if smoke else 8)
    steps = args.steps if args.steps is not None else (SMOKE["steps"] if smoke else DEFAULT_STEPS)
    per_class = args.per_class if args.per_class is not None else (SMOKE["per_class"] if smoke else 20)
    train_size = args.train_size if args.train_size is not None else (SMOKE["train_size"] if smoke else 1000)
    for name, v, lo in (("--trials", trials, 1), ("--steps", steps, 4), ("--per-class", per_class, 1),
                        ("--train-size", train_size, 2)):
        if v < lo:
            raise SearchError(f"{name} must be >= {lo}, got {v}")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        raise SearchError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    if not 0 < args.tau <= 1:
        raise SearchError(f"--tau must be in (0, 1], got {args.tau}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise SearchError("--max-concurrent must be >= 1")
    space_path = Path(args.space) if args.space else DEFAULT_SPACE
    space = load_space(space_path)  # ConfigError names the bad entry
    if args.classifier and not args.classifier.startswith("models:/") and not Path(args.classifier).is_file():
        raise SearchError(f"--classifier {args.classifier}: no such file (or use models:/name@alias)")
    if args.classifier and args.classifier.startswith("models:/"):
        from tldr_core.platform.registry import parse_models_uri

        parse_models_uri(args.classifier)
    local = args.address is None
    if local and args.gpus_per_trial > 0:
        import torch

        if not torch.cuda.is_available():
            raise SearchError("--gpus-per-trial > 0 but this machine has no CUDA GPU (and no --address was given)")
    if args.max_concurrent is not None:
        max_conc = args.max_concurrent
    elif local:
        import torch

        cap = max(1, int((os.cpu_count() or 1) // args.cpus_per_trial))
        if args.gpus_per_trial > 0:
            cap = min(cap, int(torch.cuda.device_count() / args.gpus_per_trial))
        max_conc = max(1, cap)
    else:
        max_conc = 8
    eval_every = max(1, steps // 4)
    experiment = args.experiment or f"tldr-{args.dataset}"
    storage = args.storage or str(tr.runs_dir() / "tune")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    return SearchSettings(
        dataset=args.dataset, train_size=train_size, data_root=args.data_root, download=args.download,
        trials=trials, max_concurrent=max_conc, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, steps=steps, eval_every=eval_every, log_every=log_every_for(eval_every),
        per_class=per_class, eval_per_class=min(per_class, 10), tau=args.tau, objective=args.objective,
        seed=args.seed, experiment=experiment, tracking_uri=tr.normalize_tracking_uri(
            args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")),
        storage=storage, search_name=f"search-{time.strftime('%Y%m%d-%H%M%S')}",
        classifier=str(Path(args.classifier).resolve()) if args.classifier and not args.classifier.startswith("models:/")
        else args.classifier,
        classifier_epochs=SMOKE["classifier_epochs"] if smoke else 15,
        space=space.as_dict(), space_source=str(space_path.resolve()), smoke_test=smoke, scheduler=args.scheduler)


def _check_ray_address(address: str | None) -> None:
    if address is None or address == "auto":
        return  # local: started below; auto: ray.init reports a missing cluster at once
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise SearchError(f"--address {address!r}: expected host:port, ray://host:port or auto")
    why = tr.tcp_reachable(host, int(port), timeout=5)
    if why:
        raise SearchError(f"Ray cluster at {address} is unreachable ({why}); start it or drop --address "
                          "to run a local Ray")


def _ray_temp_dir() -> Path:
    """Ray's temp/session folder inside the runs folder, unless that path is too long for its sockets."""
    import hashlib
    import tempfile

    preferred = tr.runs_dir() / "ray"
    if len(str(preferred)) <= 40:
        return preferred
    short = Path(tempfile.gettempdir()) / f"tldr-ray-{hashlib.sha1(str(preferred).encode()).hexdigest()[:8]}"
    if len(str(short)) > 40:
        short = Path("/tmp") / f"tldr-ray-{hashlib.sha1(str(preferred).encode()).hexdigest()[:8]}"
    return short


# ----------------------------------------------------------------------------------------- the search

class Search:
    def __init__(self, st: SearchSettings, say, resume_run=None) -> None:
        self.st, self.say, self.resume_run = st, say, resume_run
        self.t0 = time.time()
        self.c = tr.client(st.tracking_uri)
        self.experiment_id: str | None = None
        self.run_id: str | None = resume_run.info.run_id if resume_run else None
        self.args_address: str | None = None
        self.remove_after: Path | None = None

    def _elapsed(self) -> str:
        return f"{time.time() - self.t0:.0f}s"

    def prepare_tracking(self) -> None:
        self.experiment_id = tr.ensure_experiment(self.c, self.st.experiment, tr.runs_dir() / "mlartifacts")

    def load_inputs(self):
        import torch

        from tldr_core.attack.classifier import ClassifierSettings, accuracy, load_or_train
        from tldr_core.attack.data import load_dataset

        st = self.st
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        bundle = load_dataset(st.dataset, st.train_size, seed=0, data_root=st.data_root, download=st.download,
                              test_size=500 if st.smoke_test else None)
        self.say(f"data: {bundle.name} T={len(bundle.train)} H'={len(bundle.heldout)} test={len(bundle.test)} "
                 f"{bundle.image_shape} from {bundle.source}")
        clf_ref = None
        if st.classifier and st.classifier.startswith("models:/"):
            from tldr_core.platform.registry import load_registered_classifier

            model, meta, clf_ref, path = load_registered_classifier(self.c, st.classifier)
            self.say(f"classifier: {clf_ref.uri} from the registry ({path.name}, weights only)")
        elif st.classifier:
            from tldr_core.attack.checkpoints import load_classifier

            model, meta = load_classifier(st.classifier)
            path = Path(st.classifier)
            self.say(f"classifier: {path}")
        else:
            from tldr_core.attack.classifier import default_cache_dir

            settings = ClassifierSettings(epochs=st.classifier_epochs)
            model, meta, path = load_or_train(bundle, settings, cache_dir=default_cache_dir().resolve(),
                                              log=lambda s: self.say(s))
        spec = model.spec()
        if tuple(spec["in_shape"]) != tuple(bundle.image_shape) or spec["num_classes"] != bundle.num_classes:
            raise SearchError(f"the classifier expects {tuple(spec['in_shape'])} with {spec['num_classes']} classes, "
                              f"but {bundle.name} has {tuple(bundle.image_shape)} with {bundle.num_classes}")
        meta = dict(meta)
        meta["test_accuracy"] = accuracy(model, bundle.test.images, bundle.test.labels)
        return bundle, model.cpu(), meta, Path(path), clf_ref

    def open_parent_run(self) -> None:
        st = self.st
        if self.run_id:
            tr.retry(lambda: self.c.update_run(self.run_id, status="RUNNING"))
            tr.set_tags(self.c, self.run_id, {tr.STATE: "running", "tldr.resumed": time.strftime("%Y-%m-%dT%H:%M:%S")})
            return
        tags = {tr.ROLE: "search", tr.OBJECTIVE: st.objective, "tldr.dataset": st.dataset, tr.STATE: "running",
                "tldr.tune_path": f"{st.storage.rstrip('/')}/{st.search_name}", "tldr.search_name": st.search_name,
                "mlflow.note.content": f"Search over {st.trials} trials maximising {st.objective}; see summary/."}
        run = tr.retry(lambda: self.c.create_run(self.experiment_id, tags=tags, run_name=st.search_name))
        self.run_id = run.info.run_id
        params = {k: v for k, v in asdict(st).items() if k not in ("space",)}
        tr.log_params(self.c, self.run_id, params)
        tr.retry(lambda: self.c.log_dict(self.run_id, asdict(st), "search/settings.json"))
        tr.retry(lambda: self.c.log_dict(self.run_id, st.space, "search/space.yaml"))

    def register_classifier(self, model, meta, path: Path, clf_ref):
        from tldr_core.platform.registry import register_classifier

        if clf_ref is None:
            clf_ref = register_classifier(self.c, self.run_id, path, self.st.dataset, meta)
            self.say(f"classifier: test accuracy {meta['test_accuracy']:.3f}; registry {clf_ref.uri}"
                     f"{' (already registered)' if clf_ref.reused else ' (new version)'}")
        tr.set_tags(self.c, self.run_id, {"tldr.classifier_name": clf_ref.name,
                                          "tldr.classifier_version": clf_ref.version,
                                          "tldr.classifier_sha256": clf_ref.sha256})
        tr.log_metrics(self.c, self.run_id, {"classifier_test_accuracy": meta["test_accuracy"]}, 0)
        return clf_ref

    def baselines(self, bundle, model) -> dict[str, dict[str, float]]:
        from tldr_core.scoring.metrics import score_baselines
        from tldr_core.platform.tuning import baseline_metrics

        b = score_baselines(bundle.train, bundle.heldout, bundle.test, bundle.num_classes, self.st.per_class,
                            classifier=model, tau=self.st.tau, seed=self.st.seed)
        tr.log_metrics(self.c, self.run_id, baseline_metrics(b), 0)
        tr.retry(lambda: self.c.log_dict(self.run_id, b, "summary/baselines.json"))
        o = self.st.objective
        self.say(f"baselines ({o}): noise {b['noise'][o]:.4f}, class means {b['class_mean'][o]:.4f}, "
                 f"real held-out {b['heldout_real'][o]:.4f}")
        return b

    def start_ray(self):
        import ray

        st = self.st
        env = {"RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
               "GIT_PYTHON_REFRESH": "quiet", "PYTHONUNBUFFERED": "1"}
        if self.args_address is None:
            tmp = tr.runs_dir() / "tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            env.update({"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                        "TMPDIR": str(tmp), "TLDR_RUNS": str(tr.runs_dir())})
            temp_dir = _ray_temp_dir()
            if not str(temp_dir).startswith(str(tr.runs_dir())) and not temp_dir.exists():
                self.remove_after = temp_dir  # a short stand-in outside runs/: removed when the search ends
            temp_dir.mkdir(parents=True, exist_ok=True)
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     _temp_dir=str(temp_dir), runtime_env={"env_vars": env}, logging_level="ERROR",
                     configure_logging=True)
        else:
            try:
                ray.init(address=self.args_address, log_to_driver=False, runtime_env={"env_vars": env},
                         logging_level="ERROR")
            except (ConnectionError, RuntimeError) as exc:
                raise SearchError(f"cannot connect to the Ray cluster at {self.args_address}: {exc}") from None
        res = ray.cluster_resources()
        self.say(f"ray: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; {st.max_concurrent} trials at once, "
                 f"{st.cpus_per_trial:g} CPU + {st.gpus_per_trial:g} GPU each")

    def tuner(self, inputs, space):
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        from tldr_core.platform.tuning import MlflowTrialStatus, run_trial

        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        st = self.st
        trainable = tune.with_resources(tune.with_parameters(run_trial, inputs=inputs),
                                        {"cpu": st.cpus_per_trial, "gpu": st.gpus_per_trial})
        path = f"{st.storage.rstrip('/')}/{st.search_name}"
        if self.resume_run is not None and tune.Tuner.can_restore(path):
            self.say(f"resuming the Ray Tune state in {path}")
            return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
        points = [space.to_optuna_params(p) for p in space.initial_points]
        searcher = OptunaSearch(space=space, metric=st.objective, mode="max", seed=st.seed,
                                points_to_evaluate=points or None)
        searcher = ConcurrencyLimiter(searcher, max_concurrent=st.max_concurrent)
        scheduler = (FIFOScheduler() if st.scheduler == "fifo" else
                     ASHAScheduler(time_attr="step", max_t=st.steps, grace_period=st.eval_every, reduction_factor=2))
        callback = MlflowTrialStatus(st.tracking_uri, self.experiment_id, self.run_id, st.objective, st.trials)
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=st.trials,
                                        metric=st.objective, mode="max", reuse_actors=True),
            run_config=tune.RunConfig(name=st.search_name, storage_path=st.storage, callbacks=[callback], verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
        )


def _find_resume_run(c, experiment: str, which: str):
    if which != "latest":
        try:
            run = c.get_run(which)
        except Exception as exc:  # noqa: BLE001
            raise SearchError(f"--resume {which}: no such run ({str(exc).splitlines()[0][:160]})") from None
        if run.data.tags.get(tr.ROLE) != "search":
            raise SearchError(f"--resume {which}: not a search run")
        if run.info.status == "FINISHED":
            raise SearchError(f"--resume {which}: that search already finished")
        return run
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise SearchError(f"--resume: experiment {experiment!r} does not exist in this tracking store")
    runs = c.search_runs([exp.experiment_id], f"tags.`{tr.ROLE}` = 'search' and attributes.status != 'FINISHED'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SearchError(f"--resume: experiment {experiment!r} has no unfinished search "
                          "(pass a search run id, or start a new search without --resume)")
    return runs[0]


def _load_settings(c, run) -> SearchSettings:
    import mlflow

    mlflow.set_tracking_uri(c.tracking_uri)
    data = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/search/settings.json")
    return SearchSettings(**data)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    say = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    tr.quiet_mlflow_env()
    search: Search | None = None
    status = "FAILED"
    try:
        # ---- every check before any work: arguments, space, tracking store, Ray address
        st = _settings_from_args(args)
        tr.check_tracking_uri(st.tracking_uri)
        _check_ray_address(args.address)
        if args.address not in (None, "auto") and tr.is_local_store(st.tracking_uri):
            say(f"warning: trials on the cluster at {args.address} write to {st.tracking_uri}, a file on this "
                "machine; unless the cluster shares it, pass --tracking-uri http://<mlflow-server>:5000")
        resume_run = None
        if args.resume:
            c = tr.client(st.tracking_uri)
            resume_run = _find_resume_run(c, st.experiment, args.resume)
            stored = _load_settings(c, resume_run)
            # runtime options come from this command line; what defines the search from the stored run
            stored.tracking_uri = st.tracking_uri
            st = stored
            say(f"resuming search {st.search_name} (run {resume_run.info.run_id}): {st.trials} trials on {st.dataset}, "
                f"objective {st.objective}")
        from tldr_core.platform.search_space import space_from_dict

        space = space_from_dict(st.space, st.space_source)
        search = Search(st, say, resume_run)
        search.args_address = args.address
        search.prepare_tracking()
        say(f"search {st.search_name}: {st.trials} trials x {st.steps} steps on {st.dataset}, objective "
            f"{st.objective}; MLflow experiment {st.experiment!r} in {st.tracking_uri}")
        bundle, model, meta, path, clf_ref = search.load_inputs()
        if resume_run is not None and clf_ref is None:
            t = resume_run.data.tags
            from tldr_core.platform.registry import ClassifierRef, sha256_file

            if t.get("tldr.classifier_sha256") and sha256_file(path) != t["tldr.classifier_sha256"]:
                raise SearchError("the classifier found now differs from the one this search started with; "
                                  f"resume with --classifier models:/{t.get('tldr.classifier_name')}/"
                                  f"{t.get('tldr.classifier_version')}")
            if t.get("tldr.classifier_name"):
                clf_ref = ClassifierRef(t["tldr.classifier_name"], t["tldr.classifier_version"],
                                        t["tldr.classifier_sha256"], meta.get("test_accuracy"), reused=True)
        search.open_parent_run()
        clf_ref = search.register_classifier(model, meta, path, clf_ref)
        baselines = search.baselines(bundle, model)
        from tldr_core.platform.tuning import TrialInputs

        inputs = TrialInputs(settings=asdict(st), space=space, classifier_spec=model.spec(),
                             classifier_state={k: v.detach().cpu() for k, v in model.state_dict().items()},
                             bundle=bundle, baselines=baselines, experiment_id=search.experiment_id,
                             search_run_id=search.run_id,
                             classifier_ref={"uri": clf_ref.uri, "name": clf_ref.name, "version": clf_ref.version})
        search.start_ray()
        say(f"space ({Path(st.space_source).name}): {space.describe()}")
        tuner = search.tuner(inputs, space)
        import logging

        # Ray logs each failed trial's traceback at ERROR; the callback prints one line and MLflow holds the rest
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
        results = tuner.fit()
        statuses = [t.status for t in getattr(results, "_experiment_analysis").trials]
        finished_all = len(statuses) >= st.trials and all(s in ("TERMINATED", "ERROR") for s in statuses)
        if not finished_all:
            status = "KILLED"
            closed = tr.close_open_trial_runs(search.c, search.experiment_id, search.run_id, "KILLED", "interrupted",
                                              "search interrupted; the trial restarts on --resume")
            tr.set_tags(search.c, search.run_id, {tr.STATE: "interrupted"})
            tr.write_summary(search.c, search.experiment_id, search.run_id, st.objective, space,
                             tr.runs_dir() / "tmp" / st.search_name)
            say(f"\ninterrupted after {search._elapsed()}: {sum(s in ('TERMINATED', 'ERROR') for s in statuses)} of "
                f"{st.trials} trials done ({len(closed)} running trial(s) marked KILLED).")
            say(f"continue with:  python tune/search.py --resume {search.run_id}"
                + ("" if st.tracking_uri == tr.default_tracking_uri() else f" --tracking-uri {st.tracking_uri}"))
            return 130
        # ---- summary and promotion
        tr.close_open_trial_runs(search.c, search.experiment_id, search.run_id, "KILLED", "early-stopped")
        summary = tr.write_summary(search.c, search.experiment_id, search.run_id, st.objective, space,
                                   tr.runs_dir() / "tmp" / st.search_name)
        from tldr_core.platform.registry import promote

        promo = promote(search.c, search.run_id, log=None)
        status = "FINISHED"
        tr.set_tags(search.c, search.run_id, {tr.STATE: "finished"})
        _report(st, search, summary, promo, baselines, say if not args.quiet else print)
        return 0
    except KeyboardInterrupt:
        status = "KILLED"
        print("\ninterrupted", file=sys.stderr)
        if search is not None and search.run_id and search.experiment_id:
            try:
                tr.close_open_trial_runs(search.c, search.experiment_id, search.run_id, "KILLED", "interrupted",
                                         "search interrupted; the trial restarts on --resume")
                tr.set_tags(search.c, search.run_id, {tr.STATE: "interrupted"})
                print(f"continue with:  python tune/search.py --resume {search.run_id}", file=sys.stderr)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        return 130
    except (SearchError, ConfigError, tr.TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - data/registry/checkpoint errors: one line, not a traceback
        names = {"DataError", "DatasetNotFoundError", "CheckpointError", "RegistryError", "MlflowException"}
        if type(exc).__name__ in names:
            print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
            return 2
        raise
    finally:
        if search is not None and search.run_id:
            try:
                tr.retry(lambda: search.c.set_terminated(search.run_id, status=status))
            except Exception:  # noqa: BLE001
                pass
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        if search is not None and getattr(search, "remove_after", None):
            import shutil

            shutil.rmtree(search.remove_after, ignore_errors=True)


def _report(st: SearchSettings, search: Search, summary: dict[str, Any], promo, baselines, say) -> None:
    o = st.objective
    say(f"\nsearch {st.search_name} done in {search._elapsed()}: {summary['finished']} finished, "
        f"{summary['early_stopped']} stopped early by ASHA, {summary['failed']} failed (of {summary['trials']})")
    best = summary.get("best")
    if best:
        la = best.get("label_agreement")
        say(f"best trial {best['number']}: {o} {best[o]:.4f}, label agreement {la if la is None else round(la, 3)} "
            f"(baselines: noise {baselines['noise'][o]:.4f}, class means {baselines['class_mean'][o]:.4f}, "
            f"real held-out {baselines['heldout_real'][o]:.4f})")
        keys = ("variant", "lr", "epsilon") + tuple(__import__("tldr_core.attack.config", fromlist=["LossWeights"])
                                                    .LossWeights.names())
        say("  " + ", ".join(f"{k}={best['params'][k]}" for k in keys if k in best["params"]))
    if summary.get("importances"):
        top = sorted(summary["importances"].items(), key=lambda kv: -kv[1])[:5]
        say("most important parameters: " + ", ".join(f"{k} {v:.2f}" for k, v in top))
    say(f"registry: {promo.reason}")
    say(f"\nresults: MLflow experiment {st.experiment!r} (id {search.experiment_id}), search run {search.run_id}")
    say(f"         tracking {st.tracking_uri}")
    say(f"         Ray Tune state {st.storage.rstrip('/')}/{st.search_name}")
    if st.tracking_uri.startswith("sqlite:"):
        db = st.tracking_uri[len("sqlite:///"):]
        cmd = "make ui" if st.tracking_uri == tr.default_tracking_uri() else f"python mlflow/serve.py --db {db}"
        say(f"open the UI:  {cmd}   then  http://127.0.0.1:5000/#/experiments/{search.experiment_id}/runs/{search.run_id}")
    else:
        say(f"open the UI:  {st.tracking_uri.rstrip('/')}/#/experiments/{search.experiment_id}/runs/{search.run_id}")


if __name__ == "__main__":
    sys.exit(main())
