"""The uncompressed baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from effivlm.methods.base import Method
from effivlm.methods.registry import register_method


@register_method
@dataclass(frozen=True)
class Dense(Method):
    """No compression: the reference every other method is compared with."""

    name: ClassVar[str] = "dense"
    kind: ClassVar[str] = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget != 1.0:
            raise ValueError(f"method 'dense': budget must be 1.0, got {self.budget}")
