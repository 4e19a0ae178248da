"""Run settings as frozen dataclasses, validated on construction.

Everything here is plain data (no torch): the CLI builds these, the core reads them, and the
settings that change the numbers are hashed into the output's `config_hash`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from merge_cli.errors import UsageError
from merge_cli.grid import ResizePolicy

# Pillow's own default decompression-bomb limit (Image.MAX_IMAGE_PIXELS), kept explicit here.
PILLOW_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)


def default_video_max_pixels(factor: int) -> int:
    """Per-frame pixel ceiling for video: 64 merged tokens (224x224 for patch 14), as OneVision saw."""
    return 64 * factor**2


def default_video_total_pixels(factor: int) -> int:
    """Pixel budget over all sampled frames of one video: 32 frames at the per-frame default."""
    return 32 * default_video_max_pixels(factor)


@dataclass(frozen=True)
class VideoOptions:
    """How frames are sampled from a video and how large each may be."""

    fps: float | None = 2.0
    """Frames sampled per second of video; ignored when `num_frames` is set."""
    num_frames: int | None = None
    """Sample exactly this many frames (still bounded by the frames the video has)."""
    min_frames: int = 4
    """Lower bound on the number of sampled frames when the video has that many."""
    max_frames: int = 32
    """Upper bound on the number of sampled frames."""
    start: float | None = None
    """Seconds into the video where sampling starts."""
    end: float | None = None
    """Seconds into the video where sampling ends."""
    max_pixels: int | None = None
    """Per-frame resize ceiling in pixels [default: 64 * factor^2]."""
    total_pixels: int | None = None
    """Budget over all sampled frames in pixels [default: 32 * 64 * factor^2]."""

    def __post_init__(self) -> None:
        if self.fps is not None and self.fps <= 0:
            raise UsageError(f"--fps must be positive; got {self.fps}")
        if self.num_frames is not None and self.num_frames < 1:
            raise UsageError(f"--num-frames must be at least 1; got {self.num_frames}")
        if self.min_frames < 1:
            raise UsageError(f"--min-frames must be at least 1; got {self.min_frames}")
        if self.max_frames < self.min_frames:
            raise UsageError(f"--max-frames {self.max_frames} is below --min-frames {self.min_frames}")
        if self.start is not None and self.start < 0:
            raise UsageError(f"--video-start must not be negative; got {self.start}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise UsageError(f"--video-end {self.end} must be after --video-start {self.start}")
        for name in ("max_pixels", "total_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"video {name} must be positive; got {value}")

    def resolved(self, factor: int) -> VideoOptions:
        """A copy with the pixel defaults filled in for this merge factor."""
        from dataclasses import replace

        return replace(
            self,
            max_pixels=self.max_pixels or default_video_max_pixels(factor),
            total_pixels=self.total_pixels or default_video_total_pixels(factor),
        )


@dataclass(frozen=True)
class MediaOptions:
    """Everything between a path on disk and a resized pixel tensor."""

    policy: ResizePolicy = field(default_factory=ResizePolicy)
    """Resize policy for images (and, with the video ceiling, for video frames)."""
    video: VideoOptions = field(default_factory=VideoOptions)
    fast_decode: bool = False
    """Let Pillow decode large JPEGs at reduced size (draft mode) when the target is much smaller."""
    gif_as_video: bool = False
    """Read animated images as videos instead of taking their first frame."""
    max_image_pixels: int | None = PILLOW_MAX_IMAGE_PIXELS
    """Decompression-bomb guard: images with more pixels are refused (None: no limit)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "video", self.video.resolved(self.policy.factor))
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise UsageError(f"--max-image-pixels must be positive; got {self.max_image_pixels}")

    def to_dict(self) -> dict:
        return {
            "policy": self.policy.to_dict(),
            "video": asdict(self.video),
            "fast_decode": self.fast_decode,
            "gif_as_video": self.gif_as_video,
            "max_image_pixels": self.max_image_pixels,
        }
