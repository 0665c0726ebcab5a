"""The MLflow pyfunc flavour of tldr models: what `mlflow.pyfunc.load_model("models:/...")` returns.

A logged model's only data is a tldr weights-only checkpoint (`tldr_core.attack.checkpoints`), and
this module is its `loader_module`: loading never unpickles code (`load_classifier` /
`load_generator` use `torch.load(weights_only=True)`).

A generator samples through `tldr_core.attack.train.generate`, the one sampler the search scored its
reconstructions with (dropout kept on during generation, batch norm on its running statistics), so
for the same `per_class` and `seed` the registered model returns exactly the scored images.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from tldr_core.platform.registry.names import RegistryError

#: Recorded in every model logged by `models.log_checkpoint_model`.
LOADER_MODULE = "tldr_core.platform.registry.pyfunc"


def scored_sample(meta: dict[str, Any]) -> dict[str, int]:
    """The `per_class` and `seed` a generator checkpoint's reconstructions were scored with.

    Trials record them under meta["sample"]; older checkpoints give the attack settings, whose
    reconstructions are drawn with seed + 1 (tldr_core.cli.audit and the search trial do so).
    """
    if isinstance(meta.get("sample"), dict):
        return {k: int(meta["sample"][k]) for k in ("per_class", "seed") if k in meta["sample"]}
    attack = meta.get("attack") if isinstance(meta.get("attack"), dict) else {}
    out = {}
    if "per_class" in attack:
        out["per_class"] = int(attack["per_class"])
    if "seed" in attack:
        out["seed"] = int(attack["seed"]) + 1
    return out


def _as_dict(model_input: Any) -> dict[str, Any]:
    if hasattr(model_input, "to_dict"):  # pandas DataFrame, as MLflow's serving layer passes it
        return {k: list(v.values()) for k, v in model_input.to_dict().items()}
    if not isinstance(model_input, dict):
        raise ValueError("a generator takes {'per_class': n, 'seed': s} or {'label': [...], 'seed': s}")
    return model_input


def _scalar(value: Any) -> int:
    import numpy as np

    return int(np.asarray(value).reshape(-1)[0])


def pick_requested(labels: list[int], per_class: int, num_classes: int) -> list[int]:
    """Rows of a class-ordered batch (`per_class` images of each class) for the requested labels:
    the j-th request for class c gets row c * per_class + j, its j-th image."""
    seen: Counter[int] = Counter()
    rows = []
    for c in labels:
        if not 0 <= c < num_classes:
            raise ValueError(f"label {c} is outside 0..{num_classes - 1}")
        rows.append(c * per_class + seen[c])
        seen[c] += 1
    return rows


class CheckpointPyfunc:
    """A loaded tldr checkpoint behind MLflow's pyfunc `predict`.

    Logged models carry a signature (`signature_and_example`): a generator's input is a table with the
    optional columns per_class, seed and label (a DataFrame, or a dict of scalars / equal-length lists).

    generator:  predict({"per_class": n, "seed": s}) -> images (n*K, C, H, W) float32 in [0, 1], n of
                each of the K classes in class order: `generate(gen, n, seed=s)`. Both keys default
                to the values the reconstructions were scored with (`scored_sample`).
                predict({"label": [...], "seed": s}) -> (len(label), C, H, W): for each label its
                next image of `generate(gen, m, seed=s)`, m the largest count of one label.
    classifier: predict(images (N, C, H, W)) -> class probabilities (N, K)
    """

    def __init__(self, path: str | Path) -> None:
        from tldr_core.attack.checkpoints import CheckpointError, load_classifier, load_generator

        self.path = Path(path)
        try:
            self.model, self.meta = load_generator(self.path)
            self.kind = "generator"
        except CheckpointError:
            self.model, self.meta = load_classifier(self.path)
            self.kind = "classifier"

    def get_raw_model(self):
        return self.model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        return self._classify(model_input) if self.kind == "classifier" else self._sample(model_input)

    def _classify(self, model_input: Any):
        import numpy as np
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        x = x.reshape(-1, *self.model.spec()["in_shape"])
        with torch.no_grad():
            return torch.softmax(self.model(x), dim=1).numpy()

    def _sample(self, model_input: Any):
        import numpy as np
        import torch

        from tldr_core.attack.train import generate

        request, scored = _as_dict(model_input), scored_sample(self.meta)
        seed = _scalar(request["seed"]) if "seed" in request else scored.get("seed", 0)
        labels = [int(c) for c in np.asarray(request["label"]).reshape(-1)] if "label" in request else None
        if labels is not None:
            per_class = max(Counter(labels).values(), default=1)
        elif "per_class" in request or "per_class" in scored:
            per_class = _scalar(request["per_class"]) if "per_class" in request else scored["per_class"]
        else:
            raise ValueError("give per_class (or label): this checkpoint records no scored per_class")
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        with torch.no_grad():
            images, _ = generate(self.model, per_class, seed=seed)
        if labels is not None:
            images = images[pick_requested(labels, per_class, self.model.num_classes)]
        return images.numpy()


def signature_and_example(model: CheckpointPyfunc) -> tuple[Any, Any]:
    """(ModelSignature, input example) of a loaded checkpoint, for the logged model.

    generator:  columns per_class, seed, label (each optional: {} samples what was scored) ->
                images float32 (-1, C, H, W); example {"per_class": 1, "seed": 0}
    classifier: float32 images (-1, C, H, W) -> class probabilities (-1, K); example: one black image
    """
    import numpy as np
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    if model.kind == "generator":
        shape = tuple(int(d) for d in model.model.image_shape)
        inputs = Schema([ColSpec("long", "per_class", required=False), ColSpec("long", "seed", required=False),
                         ColSpec("long", "label", required=False)])
        outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *shape))])
        return ModelSignature(inputs, outputs), pd.DataFrame({"per_class": [1], "seed": [0]})
    spec = model.model.spec()
    shape = tuple(int(d) for d in spec["in_shape"])
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *shape))])
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, int(spec["num_classes"])))])
    return ModelSignature(inputs, outputs), np.zeros((1, *shape), dtype=np.float32)


def _load_pyfunc(data_path: str) -> CheckpointPyfunc:
    """MLflow pyfunc loader hook (`loader_module=tldr_core.platform.registry.pyfunc`): the logged .pt file."""
    p = Path(data_path)
    if p.is_dir():
        found = sorted(p.glob("*.pt"))
        if not found:
            raise RegistryError(f"no .pt checkpoint in {p}")
        p = found[0]
    return CheckpointPyfunc(p)
