"""Values given on the ``monai.bundle`` command line, read the way the YAML configs mean them.

``python -m monai.bundle run ... --amp false`` hands the config the *string* ``'false'`` (the command
line is parsed by ``fire``, which only knows Python's ``False`` / ``None``), and a string is true in
Python: without this, ``--amp false`` would leave mixed precision on and ``--crop_min_scale null``
would give the crop the scale ``'null'``. The configs read every switch a user may set on the command
line through :func:`flag` or :func:`optional`, so ``false`` / ``False`` / ``no`` / ``off`` / ``0`` and
``null`` / ``None`` / ``none`` / ``~`` mean what they mean in YAML.
"""

from __future__ import annotations

from typing import Any

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"null", "none", "~", ""}


def flag(value: Any, name: str = "value") -> bool:
    """A switch: ``True`` / ``False`` as such, their YAML spellings as strings; anything else is an error."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    if value is None:
        return False
    return bool(value)


def optional(value: Any) -> Any:
    """``None`` for ``null`` / ``None`` / ``none`` / ``~`` given as a string; any other value unchanged."""
    if isinstance(value, str) and value.strip().lower() in _NONE:
        return None
    return value


def same(value: Any) -> Any:
    """``value`` itself. ``{_target_: scripts.config_values.same, value: '@train#loss_log'}`` puts an object
    defined elsewhere in the config into a list whose entries tools read as dicts with a ``_target_``
    (the Model Zoo's property check reads ``train#handlers`` so), without building it twice."""
    return value
