"""One search's driver state in MLflow: the experiment, the parent (search) run, the data, the audited
classifier (registered once), the baselines, and what every trial shares (`TrialInputs`).
Also finding an unfinished search to resume and reading back its stored settings.

The data and the classifier are loaded and checked before anything is created in the tracking store
(database, experiment, run). The parent run carries what is the same for every trial, once: the
baselines (`baseline/<set>/<score>`), the classifier's test accuracy, the data sets (T, H', test)."""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from tldr_core.platform.search.settings import SearchError, SearchSettings
from tldr_core.platform.tracking import store as tr


def find_resume_run(c, experiment: str, which: str):
    """The search run to continue: the run `which`, or ("latest") the experiment's latest unfinished search."""
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


def load_settings(c, run) -> SearchSettings:
    """The SearchSettings a search stored on its run (search/settings.json)."""
    import mlflow

    mlflow.set_tracking_uri(c.tracking_uri)
    return SearchSettings(**mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/search/settings.json"))


def source_name() -> str:
    """What started this search, for the runs' mlflow.source.name: the command as typed (`tldr search`,
    `tune/search.py`, `tune/reaudit.py`), else the program's name."""
    import sys

    from tldr_core.platform.cli_flags import invoked_as

    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return invoked_as or {"search.py": "tune/search.py", "reaudit.py": "tune/reaudit.py"}.get(prog, prog or "tldr")


class SearchRun:
    """The driver's side of one search; `prepare()` does everything before Ray starts."""

    def __init__(self, st: SearchSettings, say: Callable[[str], None], resume_run=None) -> None:
        from tldr_core.platform.search.spaces.load import space_from_dict

        self.st, self.say, self.resume_run = st, say, resume_run
        self.space = space_from_dict(st.space, st.space_source, st.attack)
        self.t0 = time.time()
        self._c = None
        self.experiment_id: str | None = None
        self.run_id: str | None = resume_run.info.run_id if resume_run else None
        self.bundle = self.model = self.clf_ref = None
        self.baselines: dict[str, dict[str, float]] = {}
        self.run_tags: dict[str, str] = {}   # mlflow.user, mlflow.source.*: the driver's, for every run
        self.datasets: list[Any] = []
        self.ray_temp: Path | None = None  # a short Ray temp folder outside the runs folder, removed at the end

    @property
    def c(self):
        """The tracking client, made on first use: loading the data and the classifier creates nothing."""
        if self._c is None:
            self._c = tr.client(self.st.tracking_uri)
        return self._c

    def elapsed(self) -> str:
        return f"{time.time() - self.t0:.0f}s"

    def prepare(self) -> None:
        """Data and classifier first (their errors leave the tracking store untouched), then the
        experiment, the parent run, the registered classifier and the baselines."""
        st = self.st
        self.say(f"search {st.search_name}: {st.trials} {st.attack} trials x {st.steps} steps on {st.dataset}, "
                 f"objective {st.objective}; MLflow experiment {st.experiment!r} in {tr.redact(st.tracking_uri)}")
        self.bundle = self._load_data()
        model, meta, path, clf_ref = self._load_classifier(self.bundle)
        self._fit_space(model)
        if self.resume_run is not None and clf_ref is None:
            clf_ref = self._resumed_classifier(path, meta)
        self.experiment_id = tr.ensure_experiment(self.c, st.experiment, tr.runs_dir() / "mlartifacts")
        self.run_tags = tr.context_tags(source_name())
        self.datasets = tr.dataset_inputs(self.bundle)
        self._open_parent_run()
        self.model, self.clf_ref = model, self._register_classifier(meta, path, clf_ref)
        self.baselines = self._score_baselines(self.bundle, model)

    def trial_inputs(self):
        from tldr_core.platform.search.trial_inputs import TrialInputs

        m, ref = self.model, self.clf_ref
        return TrialInputs(settings=asdict(self.st), space=self.space, classifier_spec=m.spec(),
                           classifier_state={k: v.detach().cpu() for k, v in m.state_dict().items()},
                           bundle=self.bundle, baselines=self.baselines, experiment_id=self.experiment_id,
                           search_run_id=self.run_id,
                           classifier_ref={"uri": ref.uri, "name": ref.name, "version": ref.version},
                           run_tags=self.run_tags, datasets=self.datasets)

    def end(self, status: str) -> None:
        """End the parent run with `status` (best effort: the search's own error matters more)."""
        if self.run_id:
            try:
                tr.retry(lambda: self.c.set_terminated(self.run_id, status=status))
            except Exception:  # noqa: BLE001
                pass

    # ------------------------------------------------------------------ inputs
    def _load_data(self):
        import torch

        from tldr_core.attack.data import load_dataset

        st = self.st
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        bundle = load_dataset(st.dataset, st.train_size, seed=0, data_root=st.data_root, download=st.download,
                              test_size=500 if st.smoke_test else None)
        self.say(f"data: {bundle.name} T={len(bundle.train)} H'={len(bundle.heldout)} test={len(bundle.test)} "
                 f"{bundle.image_shape} from {bundle.source}")
        return bundle

    def _load_classifier(self, bundle):
        """(model on the CPU, meta with test_accuracy on this data, checkpoint path, ClassifierRef or None)."""
        from tldr_core.attack.classifier import accuracy

        st, clf_ref = self.st, None
        if st.classifier and st.classifier.startswith("models:/"):
            from tldr_core.platform.registry.models import load_registered_classifier

            db = tr.sqlite_path(st.tracking_uri)
            if db is not None and not db.exists():
                raise SearchError(f"--classifier {st.classifier}: the tracking store {db} does not exist, so it "
                                  "holds no registered model (pass the --tracking-uri that registered it)")
            model, meta, clf_ref, path = load_registered_classifier(self.c, st.classifier)
            self.say(f"classifier: {clf_ref.uri} from the registry ({path.name}, weights only)")
        elif st.classifier:
            from tldr_core.attack.checkpoints import load_classifier

            model, meta = load_classifier(st.classifier)
            path = Path(st.classifier)
            self.say(f"classifier: {path}")
        else:
            from tldr_core.attack.classifier import ClassifierSettings, default_cache_dir, load_or_train

            model, meta, path = load_or_train(bundle, ClassifierSettings(epochs=st.classifier_epochs),
                                              cache_dir=default_cache_dir().resolve(), log=lambda s: self.say(s))
        spec = model.spec()
        if tuple(spec["in_shape"]) != tuple(bundle.image_shape) or spec["num_classes"] != bundle.num_classes:
            raise SearchError(f"the classifier expects {tuple(spec['in_shape'])} with {spec['num_classes']} classes, "
                              f"but {bundle.name} has {tuple(bundle.image_shape)} with {bundle.num_classes}")
        meta = {**meta, "test_accuracy": accuracy(model, bundle.test.images, bundle.test.labels)}
        return model.cpu(), meta, Path(path), clf_ref

    def _fit_space(self, model) -> None:
        """Drop what this classifier cannot take from the space (bn without BatchNorm; `fit_to_classifier`)."""
        from tldr_core.attack.config import ConfigError
        from tldr_core.platform.search.spaces.load import fit_to_classifier

        try:
            self.space, note = fit_to_classifier(self.space, model)
        except ConfigError as exc:
            raise SearchError(str(exc)) from None
        if note:
            self.say(f"space: {note}")

    def _resumed_classifier(self, path: Path, meta: dict[str, Any]):
        """The registered classifier a resumed search started with; SearchError if the file changed."""
        from tldr_core.platform.registry.models import ClassifierRef, sha256_file

        t = self.resume_run.data.tags
        if t.get("tldr.classifier_sha256") and sha256_file(path) != t["tldr.classifier_sha256"]:
            raise SearchError("the classifier found now differs from the one this search started with; "
                              f"resume with --classifier models:/{t.get('tldr.classifier_name')}/"
                              f"{t.get('tldr.classifier_version')}")
        if not t.get("tldr.classifier_name"):
            return None
        return ClassifierRef(t["tldr.classifier_name"], t["tldr.classifier_version"], t["tldr.classifier_sha256"],
                             meta.get("test_accuracy"), reused=True)

    # ------------------------------------------------------------------ MLflow
    def _open_parent_run(self) -> None:
        st = self.st
        if self.run_id:
            tr.retry(lambda: self.c.update_run(self.run_id, status="RUNNING"))
            tr.set_tags(self.c, self.run_id, {tr.STATE: "running", "tldr.resumed": time.strftime("%Y-%m-%dT%H:%M:%S")})
            return
        tags = {**self.run_tags, tr.ROLE: "search", tr.OBJECTIVE: st.objective, "tldr.dataset": st.dataset, tr.STATE: "running",
                tr.ATTACK: st.attack,
                "tldr.tune_path": f"{st.storage.rstrip('/')}/{st.search_name}", "tldr.search_name": st.search_name,
                "mlflow.note.content": f"Search over {st.trials} trials maximising {st.objective}; see summary/."}
        run = tr.retry(lambda: self.c.create_run(self.experiment_id, tags=tags, run_name=st.search_name))
        self.run_id = run.info.run_id
        tr.log_params(self.c, self.run_id, {k: v for k, v in asdict(st).items() if k != "space"})
        # credentials stay out of the stored settings: --resume takes the tracking URI of its own command
        stored = {k: tr.redact(v) if isinstance(v, str) else v for k, v in asdict(st).items()}
        tr.retry(lambda: self.c.log_dict(self.run_id, stored, "search/settings.json"))
        if self.datasets:
            tr.retry(lambda: self.c.log_inputs(self.run_id, datasets=self.datasets))
        tr.retry(lambda: self.c.log_dict(self.run_id, st.space, "search/space.yaml"))

    def _register_classifier(self, meta: dict[str, Any], path: Path, clf_ref):
        from tldr_core.platform.registry.models import register_classifier

        if clf_ref is None:
            clf_ref = register_classifier(self.c, self.run_id, path, self.st.dataset, meta)
            self.say(f"classifier: test accuracy {meta['test_accuracy']:.3f}; registry {clf_ref.uri}"
                     f"{' (already registered)' if clf_ref.reused else ' (new version)'}")
        tr.set_tags(self.c, self.run_id, {"tldr.classifier_name": clf_ref.name,
                                          "tldr.classifier_version": clf_ref.version,
                                          "tldr.classifier_sha256": clf_ref.sha256})
        tr.log_metrics(self.c, self.run_id, {"classifier/test_accuracy": meta["test_accuracy"]}, 0)
        return clf_ref

    def _score_baselines(self, bundle, model) -> dict[str, dict[str, float]]:
        """The baseline sets scored like a trial's reconstructions (pipeline.score_images), so every
        objective, the exposure ones included, has its baselines."""
        from tldr_core.platform.search.trial_inputs import baseline_metrics
        from tldr_core.scoring.metrics import baseline_sets
        from tldr_core.scoring.pipeline import reference_index, score_images

        st, index = self.st, reference_index(bundle)
        sets = baseline_sets(index, bundle.test, bundle.num_classes, st.per_class, seed=st.seed)
        b = {name: score_images(images, labels, model, bundle, tau=st.tau, seed=st.seed, index=index)[0]
             for name, (images, labels) in sets.items()}
        tr.log_metrics(self.c, self.run_id, baseline_metrics(b), 0)
        tr.retry(lambda: self.c.log_dict(self.run_id, b, "summary/baselines.json"))
        self.say(f"baselines ({st.objective}): noise {b['noise'][st.objective]:.4f}, class means "
                 f"{b['class_mean'][st.objective]:.4f}, real held-out {b['heldout_real'][st.objective]:.4f}")
        return b
