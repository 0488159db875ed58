"""User settings (model, device, precision, quantization, generation limits, server address, the
passes of an evidence map) kept
in application settings; a remote server's token is not a setting: it is never stored.

``store`` is anything with ``value(key, default)`` and ``setValue(key, value)``: a QSettings in
Slicer, a QSettings on a temporary file in tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Protocol

DEVICES = ("auto", "cuda", "cpu", "mps")
PRECISIONS = ("auto", "float32", "float16", "bfloat16")
QUANTIZATIONS = ("none", "8bit", "4bit")  # of the language model's decoder layers (bitsandbytes)
PREFIX = "Med3DVLM/"


class SettingsStore(Protocol):
    def value(self, key: str, default: Any = None) -> Any: ...
    def setValue(self, key: str, value: Any) -> None: ...


@dataclass(frozen=True)
class Settings:
    model: str = "demo"  # "demo" or a model folder
    device: str = "auto"
    dtype: str = "auto"
    quantization: str = "none"  # "8bit" / "4bit" fit the 7B model on a 16 GB GPU
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy (deterministic)
    server: str = ""  # a remote model server's URL; empty: the module's own local server
    evidence_samples: int = 8  # forward and backward passes of an evidence map: more are smoother and slower

    @property
    def load_key(self) -> tuple:
        """What the loaded model depends on: a change reloads it."""
        return tuple(self.load_arguments().values())

    def load_arguments(self) -> dict[str, Any]:
        """Keyword arguments for ``med3dvlm.load``."""
        quantization = None if self.quantization == "none" else self.quantization
        return {"model": self.model, "device": self.device, "dtype": self.dtype, "quantization": quantization}

    def generation(self) -> dict[str, Any]:
        """Keyword arguments for ``pipeline.report/ask``: temperature 0 means greedy decoding."""
        if self.temperature > 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": False}

    def updated(self, **changes: Any) -> Settings:
        """A copy with ``changes`` coerced to the field types; unknown names raise TypeError."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        return replace(self, **{name: _coerce(name, value) for name, value in changes.items()})


def _coerce(name: str, value: Any) -> Any:
    """QSettings hands back strings from INI files: convert and clamp to sane ranges."""
    if name == "max_new_tokens":
        return max(1, min(8192, int(float(value))))
    if name == "temperature":
        return max(0.0, min(2.0, float(value)))
    if name == "evidence_samples":
        return max(1, min(64, int(float(value))))
    value = str(value).strip()
    if name == "server":
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"the server address must start with http:// or https://, got {value!r}")
        return value.rstrip("/")
    if name == "device" and value not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {value!r}")
    if name == "dtype" and value not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
    if name == "quantization" and value not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {value!r}")
    return value or "demo"


def load_settings(store: SettingsStore | None) -> Settings:
    """Stored settings; a missing or unreadable value falls back to its default."""
    settings = Settings()
    if store is None:
        return settings
    for name in asdict(settings):
        raw = store.value(PREFIX + name, None)
        if raw is None:
            continue
        try:
            settings = settings.updated(**{name: raw})
        except (TypeError, ValueError):
            pass  # a hand-edited bad value must not stop the module from opening
    return settings


def save_settings(store: SettingsStore | None, settings: Settings) -> None:
    if store is None:
        return
    for name, value in asdict(settings).items():
        store.setValue(PREFIX + name, value)
