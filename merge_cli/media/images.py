"""Decode and resize one sample: a file (or bytes in a container) -> uint8 pixels on a patch-aligned even grid.

Media inside a tar shard or a Parquet file is decoded from memory: its bytes are read in place
(one seek into the tar, one cell of a row group) and handed to Pillow, decord or PyAV as a
buffer, never written to disk.

`decode_sample` never raises for bad input: whatever a file does wrong becomes a `Failure`
(key, stage, error type, message), and the run goes on. Stages:

  open    the file is missing, a directory, a broken link, empty, of an unknown format, has no
          video stream, or is larger than the decompression-bomb limit (all known from the header)
  decode  pixel data that cannot be decoded: truncated or corrupt files, no decodable frames
  sample  no frame in the requested --video-start/--video-end range
  resize  the resize policy refuses the size: smaller than one merge window, aspect ratio > 200

Pixels stay uint8 here (4x less to move from DataLoader workers to the GPU than floats);
`normalize` turns them into the tower's input on whatever device they end up on.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from merge_cli.config import MediaOptions
from merge_cli.errors import GridError, MediaError, error_text
from merge_cli.media import video
from merge_cli.media.grid import ResizePlan, ResizePolicy, TooSmallError
from merge_cli.media.probe import (
    image_orientation,
    pillow_limit_lifted,
    probe_video,
    transposes,
)
from merge_cli.records import (
    IMAGE_EXTENSIONS,
    Failure,
    Item,
    ParquetCell,
    Sample,
    TarMember,
    escape_text,
)

# Pillow modes holding 16-bit samples; Pillow's own convert("RGB") clips them at 255 instead of scaling.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
_DRAFT_FORMATS = frozenset({"JPEG", "MPO"})
_GIF_DEFAULT_FRAME_MS = 100  # what browsers show for frames without (or with a zero) duration


def decode_sample(sample: Sample, options: MediaOptions) -> Item | Failure:
    """Decode, orient, convert and resize one sample; any problem becomes a Failure, never raises."""
    try:
        if sample.kind == "image":
            return _decode_image(sample, options)
        if sample.suffix in IMAGE_EXTENSIONS:  # an animated GIF read as video
            return _decode_animation(sample, options)
        return _decode_video(sample, options)
    except MediaError as error:
        return Failure(sample.key, error.stage, error.error_type, escape_text(str(error)))
    except Exception as error:  # an unforeseen library error is still one sample's row, not a crash
        return Failure(sample.key, "decode", type(error).__name__, escape_text(_describe(error)))


def plan_sample(sample: Sample, options: MediaOptions) -> tuple[int, int, int]:
    """(frames, patch rows, patch cols) the sample will have after resizing, from headers only.

    Raises MediaError whenever decoding would fail on what the header shows (unreadable header,
    decompression bomb, a size the policy refuses, an empty frame range). For videos whose header
    keeps no frame count (Matroska, WebM) the count is estimated from the duration.
    """
    from PIL import Image

    source = media_source(sample)
    if sample.kind == "image" or sample.suffix in IMAGE_EXTENSIONS:
        with pillow_limit_lifted(), _stage("open"), Image.open(_readable(source)) as image:
            _check_pixel_limit(image.size, options.max_image_pixels)
            height, width = _displayed_hw(image)
            if sample.kind == "image":
                return (1, *_plan(height, width, options.policy).grid)
            durations = _frame_durations(image)
        indices = _animation_indices(durations, options)
    else:
        info = probe_video(source, stage="open")
        height, width = info.height, info.width
        indices = video.sample_frame_indices(info.num_frames, info.fps or 0.0, options.video)
        if not indices:
            raise _empty_range(options, info.num_frames, info.fps)
    policy = video_frame_policy(options, len(indices))
    return (len(indices), *_plan(height, width, policy, "video frame").grid)


def normalize(
    pixels: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
    rescale: float = 1 / 255,
) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> (x * rescale - mean) / std per channel, in `dtype`, on the pixels' device.

    `rescale` is the checkpoint's rescale_factor (1/255, or 1 when its processor does not
    rescale). Computed in float32 (one multiply-add per element) and cast to `dtype` at the end.
    """
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels; got {pixels.dtype}")
    if pixels.dim() < 3 or pixels.shape[-3] != 3:
        raise ValueError(f"normalize expects (T, 3, H, W) pixels; got shape {tuple(pixels.shape)}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each; got {len(mean)} and {len(std)}")
    mean_t = torch.tensor(mean, dtype=torch.float64)
    std_t = torch.tensor(std, dtype=torch.float64)
    scale = (float(rescale) / std_t).to(torch.float32).view(3, 1, 1).to(pixels.device)
    shift = (mean_t / std_t).to(torch.float32).view(3, 1, 1).to(pixels.device)
    return pixels.to(torch.float32).mul_(scale).sub_(shift).to(dtype)


def to_rgb(image):
    """Any Pillow mode -> RGB: transparency composited onto white, 16-bit samples scaled (v / 257)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def video_frame_policy(options: MediaOptions, num_frames: int) -> ResizePolicy:
    """The resize policy for every frame of a video with `num_frames` sampled frames.

    native: ceiling min(video max_pixels, video total_pixels / num_frames), never below one merge
    window. qwen (Qwen's own rules): floor video min_pixels, ceiling qwen-vl-utils' share of the
    total per temporal patch (processor.qwen_frame_ceiling). Only the smart rule has pixel
    bounds: the other checkpoint rules size a frame as their processor sizes an image.
    """
    policy, settings = options.policy, options.video
    assert settings.max_pixels is not None and settings.total_pixels is not None  # resolved in MediaOptions
    if settings.rule == "qwen":
        from merge_cli.media.processor import qwen_frame_ceiling

        assert settings.min_pixels is not None
        ceiling = qwen_frame_ceiling(
            settings.min_pixels, settings.max_pixels, settings.total_pixels, num_frames, settings.frame_multiple
        )
        return policy.with_pixels(settings.min_pixels, max(policy.factor**2, ceiling))
    ceiling = min(settings.max_pixels, settings.total_pixels // max(1, num_frames))
    return policy.with_pixels(settings.min_pixels, max(policy.factor**2, ceiling))


def frame_resample(options: MediaOptions) -> str:
    """The filter video frames are resized with: the video processor's, else the image policy's."""
    return options.video.resample or options.policy.resample


def media_source(sample: Sample) -> Path | bytes:
    """What to decode: the checked path of a file, or the bytes of a container's member or cell."""
    from merge_cli.inputs.parquet import read_cell
    from merge_cli.inputs.webdataset import read_member

    if isinstance(sample.member, TarMember):
        return read_member(sample.path, sample.member)
    if isinstance(sample.member, ParquetCell):
        found = read_cell(sample.path, sample.member)
        if isinstance(found, bytes):
            return found
        _check_file(found)  # a datasets Image struct that names a file instead of holding bytes
        return found
    _check_file(sample.path)
    return sample.path


def _readable(source: Path | bytes) -> Path | io.BytesIO:
    """What Pillow opens: the path, or a buffer over the bytes (a fresh one per reader)."""
    return io.BytesIO(source) if isinstance(source, bytes) else source


# --- images ---------------------------------------------------------------------------------------


def _decode_image(sample: Sample, options: MediaOptions) -> Item:
    from PIL import Image, ImageOps

    source = media_source(sample)
    with pillow_limit_lifted():
        with _stage("open"):
            image = Image.open(_readable(source))
        with image:
            _check_pixel_limit(image.size, options.max_image_pixels)
            header_hw = _displayed_hw(image)
            plan = _plan(*header_hw, options.policy)
            drafted = options.fast_decode and _draft(image, plan.resize_hw, transposes(image_orientation(image)))
            with _stage("decode"):
                image.load()
                oriented = image
                if image_orientation(image) != 1:  # PNG may only reveal its EXIF once loaded
                    oriented = ImageOps.exif_transpose(image)
                rgb = to_rgb(oriented)
            orig_hw = header_hw if drafted else (rgb.height, rgb.width)
            if orig_hw != header_hw:
                plan = _plan(*orig_hw, options.policy)
            pixels = _resize(rgb, plan, options.policy.resample)[None]  # (1, H, W, 3), before the file closes
    return Item(
        sample.key, "image", _to_tensor(pixels), orig_hw, plan.final_hw, "pillow", processor_grid=plan.processor_grid
    )


def _displayed_hw(image) -> tuple[int, int]:
    """(height, width) of an opened image as displayed, after EXIF orientation."""
    width, height = image.size
    return (width, height) if transposes(image_orientation(image)) else (height, width)


def _draft(image, target: tuple[int, int], transposed: bool) -> bool:
    """Let the JPEG decoder scale by 1/2, 1/4 or 1/8 when the target is at least 2x smaller.

    Pillow's draft picks the largest such scale that keeps the image at least as large as the
    request; the exact bicubic resize then finishes. Returns whether the decoded size changed.
    """
    if image.format not in _DRAFT_FORMATS:
        return False
    height, width = target
    if transposed:
        height, width = width, height  # the file stores the image unrotated
    if image.width < 2 * width or image.height < 2 * height:
        return False
    stored = image.size
    image.draft(image.mode, (width, height))
    return image.size != stored


# --- animated images as video ---------------------------------------------------------------------


def _decode_animation(sample: Sample, options: MediaOptions) -> Item:
    """An animated image (GIF) read as a video with Pillow; timestamps from the frame durations."""
    from PIL import Image

    source = media_source(sample)
    with pillow_limit_lifted():
        with _stage("open"):
            image = Image.open(_readable(source))
        with image:
            _check_pixel_limit(image.size, options.max_image_pixels)
            with _stage("decode"):
                durations = _frame_durations(image)
            indices = _animation_indices(durations, options)
            height, width = image.height, image.width
            policy = video_frame_policy(options, len(indices))
            plan = _plan(height, width, policy, "video frame")
            frames = []
            with _stage("decode"):
                for index in indices:
                    image.seek(index)
                    frames.append(resize_frame(to_rgb(image), plan, options))
    starts = np.concatenate([[0], np.cumsum(durations)[:-1]]) / 1000.0
    return Item(
        sample.key,
        "video",
        _to_tensor(np.stack(frames)),
        (height, width),
        plan.final_hw,
        "pillow",
        processor_grid=plan.processor_grid,
        frame_indices=indices,
        frame_times=[float(starts[index]) for index in indices],
    )


def _frame_durations(image) -> list[int]:
    """Display time of every frame in milliseconds (seeks through the file, decodes nothing)."""
    durations = []
    for index in range(getattr(image, "n_frames", 1)):
        image.seek(index)
        duration = image.info.get("duration") or 0
        durations.append(duration if duration > 0 else _GIF_DEFAULT_FRAME_MS)
    image.seek(0)
    return durations


def _animation_indices(durations: list[int], options: MediaOptions) -> list[int]:
    fps = len(durations) / (sum(durations) / 1000.0)
    indices = video.sample_frame_indices(len(durations), fps, options.video)
    if not indices:
        raise _empty_range(options, len(durations), fps)
    return indices


# --- videos ---------------------------------------------------------------------------------------


def _decode_video(sample: Sample, options: MediaOptions) -> Item:
    """The faster decoder for this file first, the other when it cannot open or read the file."""
    return decode_video(sample.key, media_source(sample), options)


def decode_video(key: str, source: video.VideoInput, options: MediaOptions) -> Item:
    """Decode and resize one video from a path or from memory (bytes or a binary file object).

    Raises MediaError for anything the file does wrong; `decode_sample` turns it into a Failure.
    The decoders' native log lines are kept off stderr: the error says what they said.
    """
    from merge_cli.media.native_stderr import captured

    header: video.VideoHeader | None = None  # read once: by the first decoder that opens the file anyway
    failures: list[video.DecoderError] = []
    for decoder in video.decoder_order(options.video.seek):
        try:
            with captured():
                if header is None and not decoder.reads_header:
                    header = video.read_header(source)
                return _read_clip(key, decoder, source, header, options)
        except video.DecoderError as error:
            header = header or error.header
            failures.append(error)
    # Reported in DECODERS order: the last decoder's words (PyAV's) say most.
    ranks = {decoder.name: rank for rank, decoder in enumerate(video.DECODERS)}
    failures.sort(key=lambda failure: ranks.get(failure.decoder, -1))
    last = failures[-1]
    tried = "; ".join(f"{failure.decoder}: {type(failure.cause).__name__}" for failure in failures[:-1])
    message = _describe(last.cause) + (f" (also failed: {tried})" if tried else "")
    raise MediaError(last.stage, message, type(last.cause).__name__)


def _read_clip(
    key: str,
    decoder: type[video.VideoSource],
    source: video.VideoInput,
    header: video.VideoHeader | None,
    options: MediaOptions,
) -> Item:
    hint = _header_target(header, options)
    with decoder(source, threads=options.decode_threads, size_hint=hint, header=header) as clip:
        try:
            return _sampled_clip(key, clip, options)
        except video.DecoderError as error:
            error.header = clip.header  # the next decoder need not read it again
            raise


def _sampled_clip(key: str, clip: video.VideoSource, options: MediaOptions) -> Item:
    """Check an opened clip against its header, sample its frames, read them at the target size."""
    if clip.num_frames <= 0:
        raise MediaError("decode", "no decodable video frames", "NoDecodableFrames")
    promised = clip.header.promised_frames if clip.header else None
    if video.looks_truncated(clip.num_frames, promised):
        raise MediaError(
            "decode",
            f"the header promises {promised} frames but only {clip.num_frames} can be read; "
            "the file looks truncated",
            "TruncatedVideo",
        )
    if not clip.fps > 0:
        raise MediaError("open", "the video stream has no frame rate", "UnknownFrameRate")
    indices = video.sample_frame_indices(clip.num_frames, clip.fps, options.video)
    if not indices:
        raise _empty_range(options, clip.num_frames, clip.fps)
    orig_hw = (clip.height, clip.width)
    plan = _plan(*orig_hw, video_frame_policy(options, len(indices)), "video frame")
    if scales_in_decoder(options):
        frames = clip.read(indices, plan.resize_hw, options.video.seek, frame_resample(options))
        pixels = _crop(frames.pixels, plan)
    else:  # the checkpoint's pipeline resizes full-size RGB frames: so do we, as it does
        frames = clip.read(indices, None, options.video.seek)
        pixels = np.stack([resize_frame(frame, plan, options) for frame in frames.pixels])
    return Item(
        key,
        "video",
        _to_tensor(pixels),
        orig_hw,
        plan.final_hw,
        clip.name,
        processor_grid=plan.processor_grid,
        frame_indices=frames.indices,
        frame_times=video.frame_times(frames.indices, clip.fps),
    )


def scales_in_decoder(options: MediaOptions) -> bool:
    """Whether video frames are scaled by the decoder (swscale) on their way out of it.

    Yes with merge-cli's own preprocessing (`native`): about 47 dB PSNR against full-size RGB +
    Pillow, and no full-size RGB frame is ever made. No when a checkpoint's pipeline defines the
    pixels (`--preprocess checkpoint`): `resize_frame` then resizes as that pipeline does.
    """
    return options.mode == "native"


def _header_target(header: video.VideoHeader | None, options: MediaOptions) -> tuple[int, int] | None:
    """The frame size the header predicts (for decoders that fix their output size on opening)."""
    if not scales_in_decoder(options):
        return None
    if header is None or not header.height or not header.width or not header.promised_frames:
        return None
    indices = video.sample_frame_indices(header.promised_frames, header.fps, options.video)
    try:
        return _plan(header.height, header.width, video_frame_policy(options, max(1, len(indices))), "video frame").resize_hw
    except MediaError:
        return None  # the decoder's own numbers will raise it properly


def _empty_range(options: MediaOptions, total_frames: int, fps: float | None) -> MediaError:
    settings = options.video
    length = f"{total_frames / fps:.2f} s" if fps else f"{total_frames} frames"
    return MediaError(
        "sample",
        f"no frame between --video-start {settings.start or 0:g} s and --video-end "
        f"{'the end' if settings.end is None else f'{settings.end:g} s'}: the video lasts {length}",
        "EmptyFrameRange",
    )


# --- shared helpers -------------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    """Refuse what is not a non-empty regular file, with a message that says which problem it is."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise MediaError(
                "open", f"broken symbolic link: {path} -> {os.readlink(path)}", "BrokenSymlink"
            ) from None
        raise MediaError("open", f"no such file: {path}", "FileNotFoundError") from None
    except OSError as error:
        raise MediaError("open", f"cannot read {path}: {error.strerror}", type(error).__name__) from error
    if stat.S_ISDIR(info.st_mode):
        raise MediaError("open", f"a directory, not a file: {path}", "IsADirectoryError")
    if not stat.S_ISREG(info.st_mode):
        raise MediaError("open", f"not a regular file: {path}", "NotARegularFile")
    if info.st_size == 0:
        raise MediaError("open", f"empty file (0 bytes): {path}", "EmptyFile")


def _check_pixel_limit(size: tuple[int, int], limit: int | None) -> None:
    width, height = size
    if limit is not None and width * height > limit:
        raise MediaError(
            "open",
            f"{height}x{width} is {width * height:,} pixels, over the limit of {limit:,} "
            "(--max-image-pixels): refusing a possible decompression bomb",
            "DecompressionBombError",
        )


def _plan(height: int, width: int, policy: ResizePolicy, what: str = "image") -> ResizePlan:
    """The policy's plan for `height x width` (grid.ResizePolicy.plan, the rule check-grid shows);
    a refusal becomes a MediaError of stage `resize`."""
    try:
        return policy.plan(height, width)
    except TooSmallError as error:
        raise MediaError("resize", f"{what} {error}", "TooSmall") from error
    except GridError as error:
        raise MediaError("resize", str(error), "GridError") from error


def _resize(image, plan: ResizePlan, resample: str) -> np.ndarray:
    """Pillow resize (antialiased when shrinking) to the plan's size, then its crop -> uint8 (H, W, 3)."""
    from PIL import Image

    height, width = plan.resize_hw
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling[resample.upper()])
    return _crop(np.asarray(image), plan)


def _crop(pixels: np.ndarray, plan: ResizePlan) -> np.ndarray:
    """The plan's crop of resized pixels (..., H, W, 3); a view, and the pixels themselves when
    the plan does not crop."""
    top, left, crop_h, crop_w = plan.crop
    if (crop_h, crop_w) == plan.resize_hw:
        return pixels
    return pixels[..., top : top + crop_h, left : left + crop_w, :]


def resize_frame(frame, plan: ResizePlan, options: MediaOptions) -> np.ndarray:
    """One video frame (uint8 (H, W, 3) or an RGB Pillow image) resized and cropped to the plan
    with the video options' resizer: Pillow and the frame filter, or torchvision's pixels."""
    from PIL import Image

    if options.video.resizer == "torchvision":
        return _crop(torchvision_resize(np.asarray(frame), plan.resize_hw), plan)
    image = frame if isinstance(frame, Image.Image) else Image.fromarray(frame, "RGB")
    return _resize(image, plan, frame_resample(options))


def torchvision_resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (*size, 3): the pixels torchvision's tensor resize (bicubic,
    antialias=True) gives a uint8 frame on the CPU, as qwen-vl-utils' `fetch_video` calls it.

    torchvision (transforms.functional.resize -> _functional_tensor.resize) casts uint8 to
    float32, calls torch's `interpolate(mode="bicubic", align_corners=False, antialias=True)`
    (PyTorch's separable antialiased cubic, a = -0.5, no rounding between the two passes),
    clamps to 0..255, rounds half to even and casts back; an unchanged size is returned as is.
    The same steps here, frame by frame (each output pixel depends on its own frame only), so
    torchvision is not needed. Pillow's bicubic (also a = -0.5) rounds and clips to uint8
    after each pass, which moves some pixels by several levels.
    """
    height, width = size
    if frame.shape[:2] == (height, width):
        return frame
    if not frame.flags.writeable:  # torch wants writable memory (Pillow's arrays are read-only)
        frame = frame.copy()
    # (1, 3, H, W) over the (H, W, 3) memory: the layout qwen-vl-utils' permute of decoded frames gives
    chw = torch.from_numpy(frame).permute(2, 0, 1)[None].to(torch.float32)
    resized = torch.nn.functional.interpolate(
        chw, size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    return resized.clamp_(0, 255).round_().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> contiguous uint8 (T, 3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))


@contextmanager
def _stage(name: str) -> Iterator[None]:
    """Label whatever a library raises in this block as a MediaError of stage `name`."""
    try:
        yield
    except MediaError:
        raise
    except Exception as error:
        raise MediaError(name, _describe(error), type(error).__name__) from error


def _describe(error: BaseException) -> str:
    return error_text(error)
