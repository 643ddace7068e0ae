"""Model configuration: one typed, frozen dataclass, validated on construction.

Choices are strings ("rope", "noisy_topk", ...) so a config serializes to plain JSON and is saved
beside every checkpoint. Optional sizes left as None are resolved in `__post_init__`, so a config
read back from JSON equals the one that was written.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic_io import write_text_atomic
from .checked import number
from .errors import ConfigError

POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
FFNS = ("relu", "gelu", "swiglu")
ROUTERS = ("noisy_topk", "topk", "switch")
KERNELS = ("auto", "torch", "native")  # nanomoe/kernels: which implementation of the ops runs


def _round_up(x: float, multiple: int) -> int:
    return int(multiple * math.ceil(x / multiple))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a GPT, dense (`n_experts == 0`) or Mixture-of-Experts."""

    # --- size ---
    vocab_size: int
    block_size: int  # longest sequence the model accepts (learned positions / rope cache length)
    n_layer: int
    n_head: int
    n_embd: int
    n_kv_head: int | None = None  # None: same as n_head; fewer heads = grouped-query attention

    # --- architecture choices ---
    position: str = "learned"  # "learned" (nanoGPT) | "rope"
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    ffn: str = "relu"  # "relu" | "gelu" (4x MLP) | "swiglu"
    ffn_hidden: int | None = None  # None: 4*n_embd for relu/gelu, ~8/3*n_embd (multiple of 64) for swiglu
    bias: bool = False  # biases in every linear layer and norm (nanoGPT style when True)
    dropout: float = 0.0
    tie_embeddings: bool = False
    init_std: float = 0.02

    # --- mixture of experts (ignored when n_experts == 0) ---
    n_experts: int = 0
    top_k: int = 2
    moe_every: int = 1  # every k-th layer is MoE (1: all layers; 2: layers 1, 3, 5, ...)
    expert_hidden: int | None = None  # None: same as ffn_hidden
    router: str = "topk"  # "noisy_topk" (Shazeer 2017) | "topk" (Mixtral) | "switch" (Fedus 2021)
    n_shared_experts: int = 0  # DeepSeekMoE shared experts, always active
    capacity_factor: float = 0.0  # 0: dropless; >0: each expert takes at most ceil(cf*N*K/E) tokens
    aux_loss_coef: float = 0.0  # Switch Transformer load-balancing loss coefficient (0.01 is typical)
    z_loss_coef: float = 0.0  # ST-MoE router z-loss coefficient (0.001 is typical)
    router_bias_update_rate: float = 0.0  # DeepSeek-V3 aux-loss-free balancing; 0 disables (1e-3 typical)

    # --- implementation (not architecture: any choice computes the same model) ---
    # "auto": the native C++ kernels on a CPU where they are built, PyTorch's elsewhere; "torch";
    # "native" (CPU only). NANOMOE_KERNELS=torch|native sets what "auto" means.
    kernels: str = "auto"

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(f"invalid model config: {msg}")

        for f in dataclasses.fields(self):  # nan slips through every comparison below
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                fail(f"{f.name} must be a finite number, got {value}")

        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(f"{name} must be an integer >= 1, got {value!r}")
        if self.position not in POSITIONS:
            fail(f"position must be one of {POSITIONS}, got {self.position!r}")
        if self.norm not in NORMS:
            fail(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.ffn not in FFNS:
            fail(f"ffn must be one of {FFNS}, got {self.ffn!r}")
        if self.router not in ROUTERS:
            fail(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.kernels not in KERNELS:
            fail(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.n_embd % self.n_head != 0:
            fail(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try n_head={_nearest_divisor(self.n_embd, self.n_head)}"
            )
        n_kv_head = self.n_head if self.n_kv_head is None else self.n_kv_head
        if n_kv_head < 1 or self.n_head % n_kv_head != 0:
            fail(f"n_kv_head ({n_kv_head}) must be >= 1 and divide n_head ({self.n_head})")
        object.__setattr__(self, "n_kv_head", n_kv_head)
        if self.position == "rope" and (self.n_embd // self.n_head) % 2 != 0:
            fail(f"rope needs an even head dimension, got n_embd/n_head = {self.n_embd // self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_theta <= 0:
            fail("norm_eps, init_std and rope_theta must be > 0")

        if self.ffn_hidden is None:
            hidden = 4 * self.n_embd if self.ffn != "swiglu" else _round_up(8 * self.n_embd / 3, 64)
            object.__setattr__(self, "ffn_hidden", hidden)
        if self.ffn_hidden < 1:
            fail(f"ffn_hidden must be >= 1, got {self.ffn_hidden}")

        if self.n_experts < 0:
            fail(f"n_experts must be >= 0 (0 = dense model), got {self.n_experts}")
        if self.expert_hidden is None:
            object.__setattr__(self, "expert_hidden", self.ffn_hidden)
        if self.n_experts > 0:
            if not 1 <= self.top_k <= self.n_experts:
                fail(f"top_k ({self.top_k}) must be between 1 and n_experts ({self.n_experts})")
            if self.moe_every < 1:
                fail(f"moe_every must be >= 1 (1 = every layer is MoE), got {self.moe_every}")
            if self.moe_every > self.n_layer:
                fail(f"moe_every ({self.moe_every}) > n_layer ({self.n_layer}) leaves no MoE layer")
            if self.expert_hidden < 1:
                fail(f"expert_hidden must be >= 1, got {self.expert_hidden}")
            if self.n_shared_experts < 0:
                fail(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
            if self.capacity_factor < 0:
                fail(f"capacity_factor must be >= 0 (0 = dropless), got {self.capacity_factor}")
            for name in ("aux_loss_coef", "z_loss_coef", "router_bias_update_rate"):
                if getattr(self, name) < 0:
                    fail(f"{name} must be >= 0, got {getattr(self, name)}")

    # --- derived ---
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.is_moe and layer_idx % self.moe_every == self.moe_every - 1

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layer) if self.is_moe_layer(i)]

    # --- serialization ---
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            write_text_atomic(Path(path), text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return from_dict(cls, data)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "ModelConfig":
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "ModelConfig":
        return from_dict(type(self), {**self.to_dict(), **changes})


def _nearest_divisor(n: int, near: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - near), -d))


# ---------------------------------------------------------------------------------------------
# Generic helpers shared by every config dataclass (model, training): dict loading with clear
# errors, and `--set key=value` overrides parsed by the field's declared type.


def closest(name: str, valid) -> str:
    """' (did you mean X?)' for the valid name nearest a misspelt one, or ''."""
    match = difflib.get_close_matches(str(name), sorted(valid), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def from_dict(cls: type, data: dict[str, Any]):
    """`cls(**data)` with every key known and every value of its field's declared type."""
    if not isinstance(data, dict):
        raise ConfigError(f"a {cls.__name__} must be a table of field = value, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} field {unknown[0]!r}{closest(unknown[0], names)}; valid fields are: "
            f"{', '.join(sorted(names))}"
        )
    hints = _field_types(cls)
    data = {k: check_value(cls, k, hints[k], v) for k, v in data.items()}
    try:
        return cls(**data)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{cls.__name__}: {e}") from None


def check_value(cls: type, key: str, hint: Any, value: Any) -> Any:
    """`value` if it fits field `key`'s declared type (an int is a fine float; numbers finite)."""
    allowed = list(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    if value is None and type(None) in allowed:
        return None
    for typ in allowed:
        if typ is bool and isinstance(value, bool):
            return value
        if typ in (int, float) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            if typ is int and isinstance(value, float) and not value.is_integer():
                continue
            if isinstance(value, str):  # YAML reads 3e-4 as a string
                try:
                    number(value, key, typ)
                except ConfigError:
                    continue
            return number(value, f"{cls.__name__} field {key}", typ)
        if typ is str and isinstance(value, str):
            return value
        if typing.get_origin(typ) in (list, tuple) and isinstance(value, (list, tuple)):
            return value
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "none"}
    expected = " or ".join(names.get(t, str(t)) for t in allowed)
    raise ConfigError(f"{cls.__name__} field {key} must be {expected}, got {value!r}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_value(cls: type, key: str, raw: str) -> Any:
    """Convert the string `raw` to the declared type of field `key` of dataclass `cls`."""
    hints = _field_types(cls)
    if key not in hints:
        raise ConfigError(f"unknown {cls.__name__} field {key!r}; valid fields are: {', '.join(sorted(hints))}")
    hint = hints[key]
    allowed = [hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        allowed = [a for a in typing.get_args(hint)]
    if raw.lower() in ("none", "null") and type(None) in allowed:
        return None
    error: Exception | None = None
    for typ in allowed:
        if typ is type(None):
            continue
        try:
            if typ is bool:
                low = raw.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(raw)
            if typ in (int, float):
                return number(raw, key, typ)
            if typ is str:
                return raw
            if typing.get_origin(typ) in (list, tuple):
                return json.loads(raw)
        except (ValueError, ConfigError) as e:
            error = e
            continue
    if isinstance(error, ConfigError):
        raise ConfigError(f"cannot parse {key}={raw!r}: {error}")
    raise ConfigError(f"cannot parse {key}={raw!r}: expected {hint}")


def parse_overrides(cls: type, items: list[str] | None) -> dict[str, Any]:
    """Parse `["key=value", ...]` into typed values for dataclass `cls`."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        out[key.strip()] = parse_value(cls, key.strip(), raw.strip())
    return out


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON config file into a dict (format chosen by the file extension)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # parse errors of any of the three formats, and text that is not UTF-8
        raise ConfigError(f"cannot parse config file {path}: {str(e).splitlines()[0] if str(e) else e}") from None
    check_sections(data, path)
    return data


SECTIONS = ("preset", "recipe", "model", "train")  # what a config file may hold at the top


def check_sections(data: Any, path: Path) -> None:
    """A config file holds the sections above, or is a bare model config (a model_config.json)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of sections ({', '.join(SECTIONS)}), "
                          f"not a {type(data).__name__}")
    model_fields = field_names(ModelConfig)
    if data and set(data) <= model_fields:
        return
    for key in data:
        if key in SECTIONS:
            if key in ("model", "train") and not isinstance(data[key], dict):
                raise ConfigError(f"config file {path}: [{key}] must be a table of field = value")
            continue
        if key in model_fields:
            hint = f"; {key} is a model field: put it under [model]"
        else:
            hint = closest(key, SECTIONS) or "; training fields go under [train]"
        raise ConfigError(f"config file {path}: unknown section or key {key!r}{hint}. Valid top-level names: "
                          f"{', '.join(SECTIONS)}")


__all__ = [
    "ModelConfig",
    "POSITIONS",
    "NORMS",
    "FFNS",
    "ROUTERS",
    "KERNELS",
    "from_dict",
    "parse_value",
    "parse_overrides",
    "field_names",
    "load_config_file",
]
