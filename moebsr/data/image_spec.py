"""What the model's input must look like, handed to every loader so data adapts to the model, not the reverse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union


@dataclass(frozen=True)
class ImageSpec:
    """Model input: square ``image_size`` pixels, ``in_chans`` channels, normalised with ``mean``/``std``.

    Grey images are repeated to ``in_chans``; colour images become grey (luma) for a 1-channel model.
    """

    image_size: int = 224
    in_chans: int = 3
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.image_size < 1 or self.in_chans not in (1, 3):
            raise ValueError(f"image spec: image_size={self.image_size}, in_chans={self.in_chans}; "
                             "accepted: image_size >= 1, in_chans 1 or 3")
        if len(self.mean) not in (1, self.in_chans) or len(self.std) not in (1, self.in_chans):
            raise ValueError(f"image spec: mean/std have {len(self.mean)}/{len(self.std)} values; accepted: 1 or "
                             f"in_chans={self.in_chans}")

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``mean`` and ``std`` with exactly ``in_chans`` values."""
        mean = self.mean * self.in_chans if len(self.mean) == 1 else self.mean
        std = self.std * self.in_chans if len(self.std) == 1 else self.std
        return mean, std

    @classmethod
    def coerce(cls, spec: Union["ImageSpec", Mapping[str, Any]]) -> "ImageSpec":
        """Accept an ``ImageSpec`` or the dict ``moebsr.training.build.image_spec_of`` returns."""
        return spec if isinstance(spec, ImageSpec) else cls(**dict(spec))
