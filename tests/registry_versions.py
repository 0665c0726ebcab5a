"""Three registered versions of one classifier lineage for the registry-gate tests: the same data
(mnist-bundled, T = 100 class-balanced, split seed 0), a small MLP each:

    1  clean          20 epochs, weight decay 1e-2, hidden 32, dropout 0.25, seed 0
    2  leaky          the same data trained 100 epochs without weight decay or dropout (hidden 128, batches
                      of 10): train accuracy 1.0, its loss separates T from H' clearly (membership AUC
                      about 0.89 against the clean one's 0.74, measured)
    3  clean retrain  as 1 with seed 1

Why MNIST and not digits-8x8: MLPs on the 8x8 digits generalise so well that an over-trained one barely
separates T from H' (margin AUC 0.645 against 0.587 at T = 100; the paired difference's interval was
[-0.011, 0.124]); on MNIST at T = 100 the same recipe gives +0.147 [0.098, 0.202].

Imported by name (`import registry_versions`): tests/ is on sys.path (tests/conftest.py)."""
from __future__ import annotations

from pathlib import Path

DATASET = "mnist-bundled"
TRAIN_SIZE = 100
NAME = f"tldr-classifier-{DATASET}"
RECIPES = (("clean", dict(epochs=20, weight_decay=1e-2, hidden=32, seed=0)),
           ("leaky", dict(epochs=100, dropout=0.0, hidden=128, batch_size=10, lr=3e-3, seed=0)),
           ("retrain", dict(epochs=20, weight_decay=1e-2, hidden=32, seed=1)))
#: What a fast re-audit of them runs: 4 TLDR steps, 2 reconstructions per class, 10 KKT steps, loss and margin
#: membership only (the regression is the membership axis; the attacks are there to run, not to find it).
FAST = ["--smoke-test", "--steps", "4", "--per-class", "2", "--kkt-steps", "10", "--membership-refs", "0", "--quiet"]


def train_versions(folder: Path, n: int = 3) -> list[tuple[Path, dict]]:
    """(checkpoint, meta) of the first ``n`` versions, trained into ``folder`` (seconds on one core)."""
    from tldr_core.attack.checkpoints import CLASSIFIER_FORMAT, save_checkpoint
    from tldr_core.attack.classifier import ClassifierSettings, train_classifier
    from tldr_core.attack.data import load_dataset

    bundle = load_dataset(DATASET, TRAIN_SIZE, seed=0)
    out = []
    for name, kw in RECIPES[:n]:
        model, meta = train_classifier(bundle, ClassifierSettings(arch="mlp", **kw), log=lambda s: None)
        meta["data_seed"] = 0
        out.append((save_checkpoint(folder / f"{name}.pt", model, CLASSIFIER_FORMAT, meta), meta))
    return out


def register_versions(uri: str, folder: Path, n: int = 3) -> list[str]:
    """Train the first ``n`` versions and register them in the store ``uri``; their version numbers."""
    from tldr_core.platform.registry.models import register_classifier
    from tldr_core.platform.tracking import store as tr

    tr.check_tracking_uri(uri)
    c = tr.client(uri)
    exp = tr.ensure_experiment(c, "classifiers", folder / "mlartifacts")
    run_id = c.create_run(exp).info.run_id
    versions = [register_classifier(c, run_id, path, DATASET, meta).version for path, meta in train_versions(folder, n)]
    c.set_terminated(run_id)
    return versions
