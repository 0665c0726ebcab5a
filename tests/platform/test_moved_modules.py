"""A search interrupted before the platform's modules moved into sub-packages can still be resumed: its
saved Ray Tune state pickled the search space under the old module names, which `alias_moved_modules`
makes importable again (tldr_core.platform.search.tuner)."""
from __future__ import annotations

import pickle
import sys

import pytest

from tldr_core.platform.search import tuner
from tldr_core.platform.search.spaces.load import load_space

OLD = {b"tldr_core.platform.search.spaces.tldr_space\n": b"tldr_core.platform.search_space\n",
       b"tldr_core.platform.search.spaces.specs\n": b"tldr_core.platform.space_specs\n"}


def _as_saved_before_the_move(obj) -> bytes:
    data = pickle.dumps(obj, protocol=2)  # protocol 2 names each class as "module\nname\n"
    for new, old in OLD.items():
        assert new in data
        data = data.replace(new, old)
    return data


def test_a_space_pickled_under_the_old_module_names_loads_after_the_aliases():
    space = load_space()
    data = _as_saved_before_the_move(space)
    try:
        for old in tuner.MOVED_MODULES:
            sys.modules.pop(old, None)
        with pytest.raises(ModuleNotFoundError, match="search_space"):
            pickle.loads(data)
        tuner.alias_moved_modules()
        restored = pickle.loads(data)
        assert restored == space and type(restored) is type(space)
        assert sys.modules["tldr_core.platform.tuning"].MlflowTrialStatus.__name__ == "MlflowTrialStatus"
        assert sys.modules["tldr_core.platform.tuning"].run_trial.__module__ == "tldr_core.platform.search.trial"
    finally:
        for old in tuner.MOVED_MODULES:
            sys.modules.pop(old, None)
