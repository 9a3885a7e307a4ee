"""Old import paths of modules that moved into the stage folders, kept working for bundles made before the move.

Bundle configs name their components by import path (``"_target_": "ic_moe_monai.engines.adamw"``,
``"$ic_moe_monai.data.datalist(...)"``), and a bundle made by ``init_bundle`` or exported before the package was
arranged by stage still says ``ic_moe_monai.engines``, ``ic_moe_monai.checkpoints``, ... Two small mechanisms keep
those paths alive without a copy of any module:

- :class:`MovedModuleFinder` (installed by the package on import) answers ``import ic_moe_monai.engines`` with the
  module at its new path, so old and new path give the very same module object;
- :func:`moved_attribute` backs the package's ``__getattr__``, so ``ic_moe_monai.checkpoints.checkpoint_info`` in
  a config expression after ``$import ic_moe_monai`` resolves too.

:func:`current_paths` rewrites a config's text to the new paths (``export_bundle`` applies it to what it copies).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import re
import sys
from types import ModuleType

__all__ = [
    "MOVED_MODULES",
    "MOVED_NAMES",
    "MovedModuleFinder",
    "current_paths",
    "install",
    "moved_attribute",
    "moved_name",
]

PACKAGE = "ic_moe_monai"

# old module (under the package) -> its new place
MOVED_MODULES: dict[str, str] = {
    "transforms": "data.transforms",
    "losses": "training.losses",
    "slice_sampling": "training.slice_sampling",
    "trunk_cache": "training.trunk_cache",
    "clicks": "training.clicks",
    "engines": "training.engines",
    "handlers": "training.handlers",
    "resume": "training.resume",
    "predictor": "inference.predictor",
    "inferers": "inference.inferers",
    "postprocessing": "inference.postprocessing",
    "quality": "inference.quality",
    "evaluation": "inference.evaluation",
    "init_bundle": "bundles.initialize",
    "export_bundle": "bundles.export",
    "bundle_card": "bundles.card",
    "folders": "bundles.folders",
    "checkpoints": "networks.checkpoints",
}
# ``ic_moe_monai.data`` was a module and is now a package that exports the same names, so it needs no alias;
# ``current_paths`` still points its names at the module that defines them.
_RENAMED_IN_TEXT = {**MOVED_MODULES, "data": "data.datasets"}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook: ``ic_moe_monai.<old>`` loads ``ic_moe_monai.<new>`` and registers it under both names."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        old = fullname.removeprefix(PACKAGE + ".")
        if old == fullname or old not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def __init__(self) -> None:
        self._own_specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(new_name(spec.name))
        self._own_specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system stamped the alias' spec on the real module: give it back its own
        module.__spec__ = self._own_specs.pop(module.__name__, module.__spec__)


def new_name(fullname: str) -> str:
    """The current dotted path of a moved module's old dotted path."""
    return f"{PACKAGE}.{MOVED_MODULES[fullname.removeprefix(PACKAGE + '.')]}"


def install() -> None:
    """Put :class:`MovedModuleFinder` on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())


def moved_attribute(name: str) -> ModuleType:
    """The package attribute ``name``: a moved module under its old name, or a not yet imported subpackage."""
    if name in MOVED_MODULES:
        return importlib.import_module(f"{PACKAGE}.{name}")
    if importlib.util.find_spec(f"{PACKAGE}.{name}") is not None:
        return importlib.import_module(f"{PACKAGE}.{name}")
    raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")


# names that left their module when it was split: old dotted path (under the package) -> new one
MOVED_NAMES: dict[str, str] = {
    **{f"checkpoints.{name}": f"networks.fine_tuning.{name}"
       for name in ("FineTuneReport", "load_pretrained_weights", "read_state_dict")},
    **{f"io.dicomweb.{name}": f"io.dicomweb_series.{name}"
       for name in ("find_series", "retrieve_series", "stored_receipt")},
}  # fmt: skip


def moved_name(module: str, name: str) -> object:
    """The module ``__getattr__`` of a module that was split: ``module.name`` for a name :data:`MOVED_NAMES` says
    left ``module`` (given by its current dotted path), imported from its new module on first use."""
    for old, new in MOVED_NAMES.items():
        old_module, old_name = old.rsplit(".", 1)
        if old_name == name and f"{PACKAGE}.{MOVED_MODULES.get(old_module, old_module)}" == module:
            new_module, new_name = new.rsplit(".", 1)
            return getattr(importlib.import_module(f"{PACKAGE}.{new_module}"), new_name)
    raise AttributeError(f"module {module!r} has no attribute {name!r}")


_OLD_NAME = re.compile(rf"\b{PACKAGE}\.({'|'.join(re.escape(n) for n in MOVED_NAMES)})(?![A-Za-z0-9_])")
_OLD_PATH = re.compile(rf"\b{PACKAGE}\.({'|'.join(_RENAMED_IN_TEXT)})(?![A-Za-z0-9_])")


def current_paths(text: str) -> str:
    """``text`` (a config) with every old module path replaced by the current one; current paths stay as they are."""

    def replace(match: re.Match) -> str:
        old, after = match.group(1), text[match.end() :]
        new = _RENAMED_IN_TEXT[old]
        if old == "data" and re.match(r"\.(datasets|transforms)(?![A-Za-z0-9_])", after):
            return match.group(0)  # already ic_moe_monai.data.datasets / ic_moe_monai.data.transforms
        return f"{PACKAGE}.{new}"

    text = _OLD_NAME.sub(lambda m: f"{PACKAGE}.{MOVED_NAMES[m.group(1)]}", text)
    return _OLD_PATH.sub(replace, text)
