"""A model repository in Triton's layout: ``<repo>/<model>/config.pbtxt`` and ``<repo>/<model>/<version>/model.pt``
(TorchScript, platform ``pytorch_libtorch``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_REPOSITORY = Path(__file__).with_name("model_repository")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton data type, e.g. TYPE_FP32
    dims: tuple[int, ...]  # without the batch dimension


@dataclass(frozen=True)
class ModelConfig:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 16
    platform: str = "pytorch_libtorch"
    preferred_batch_sizes: tuple[int, ...] = (4, 16)
    max_queue_delay_us: int = 2000

    def pbtxt(self) -> str:
        def tensors(kind: str, specs: Any) -> str:
            items = ",\n".join(
                f'  {{\n    name: "{t.name}"\n    data_type: {t.dtype}\n'
                f"    dims: [ {', '.join(map(str, t.dims))} ]\n  }}"
                for t in specs
            )
            return f"{kind} [\n{items}\n]\n"

        return (
            f'name: "{self.name}"\nplatform: "{self.platform}"\nmax_batch_size: {self.max_batch_size}\n'
            + tensors("input", self.inputs)
            + tensors("output", self.outputs)
            + "dynamic_batching {\n"
            + f"  preferred_batch_size: [ {', '.join(map(str, self.preferred_batch_sizes))} ]\n"
            + f"  max_queue_delay_microseconds: {self.max_queue_delay_us}\n}}\n"
        )


_TENSOR = re.compile(r'\{\s*name:\s*"([^"]+)"\s*data_type:\s*(\w+)\s*dims:\s*\[([^\]]*)\]\s*\}', re.S)


def parse_pbtxt(text: str) -> ModelConfig:
    """Read back what :meth:`ModelConfig.pbtxt` writes (the subset of Triton's text format we use)."""
    name = re.search(r'^name:\s*"([^"]+)"', text, re.M)
    platform = re.search(r'^platform:\s*"([^"]+)"', text, re.M)
    mbs = re.search(r"^max_batch_size:\s*(\d+)", text, re.M)
    if not (name and platform and mbs):
        raise ValueError("config.pbtxt: name, platform and max_batch_size are required")

    def section(kind: str) -> tuple[TensorSpec, ...]:
        m = re.search(rf"^{kind}\s*\[(.*?)^\]", text, re.S | re.M)
        if not m:
            raise ValueError(f"config.pbtxt: no {kind} section")
        return tuple(
            TensorSpec(n, dt, tuple(int(x) for x in dims.replace(",", " ").split()))
            for n, dt, dims in _TENSOR.findall(m.group(1))
        )

    return ModelConfig(name.group(1), section("input"), section("output"), int(mbs.group(1)), platform.group(1))


def write_model(repo: Path, config: ModelConfig, scripted: Any, version: str = "1") -> Path:
    """Write config.pbtxt and ``<version>/model.pt`` (a ``torch.jit.ScriptModule``)."""
    d = Path(repo) / config.name
    (d / version).mkdir(parents=True, exist_ok=True)
    (d / "config.pbtxt").write_text(config.pbtxt())
    path = d / version / "model.pt"
    scripted.save(str(path))
    return path


def model_path(repo: Path, name: str, version: str = "1") -> Path:
    return Path(repo) / name / version / "model.pt"


def read_config(repo: Path, name: str) -> ModelConfig:
    return parse_pbtxt((Path(repo) / name / "config.pbtxt").read_text())


def list_models(repo: Path) -> list[str]:
    return sorted(p.parent.name for p in Path(repo).glob("*/config.pbtxt"))
