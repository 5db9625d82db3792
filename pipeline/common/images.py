"""Reading one image robustly, and resizing it for the teacher and the shard.

Every per-image problem raises :class:`ImageError` with a short reason that ends up in the
shard's marker json; nothing here stops a run.
"""

from __future__ import annotations

import hashlib
import os
import stat

import cv2
import numpy as np
import torch
import torch.nn.functional as F

#: smallest side we label: below this a saliency map says nothing
MIN_SIDE = 8

_configured = False


def opencv():
    """cv2, set as the pipeline uses it, once, when it first decodes, resizes or encodes (not at import: a
    researcher importing this package keeps OpenCV as they set it until they use these functions): one thread per
    call, since we parallelise over images ourselves; and silent, since an image OpenCV cannot read is a per-image
    failure with its reason, beside which its own "[ WARN:0@…]" and "[ERROR:0@…] global loadsave.cpp …" lines are
    noise (libpng's and libjpeg's own messages, which those libraries print themselves, still come through)."""
    global _configured
    if not _configured:
        cv2.setNumThreads(1)
        # (OpenCV 5 has the call in cv2.utils.logging, 4.x as cv2.setLogLevel; 0 is LOG_LEVEL_SILENT in both)
        (getattr(getattr(cv2.utils, "logging", None), "setLogLevel", None) or cv2.setLogLevel)(0)
        _configured = True
    return cv2


class ImageError(Exception):
    """This image cannot be labelled (the reason is recorded, the run goes on)."""


def _jpeg_truncated(data: bytes) -> bool:
    """A baseline or progressive JPEG ends with EOI (FFD9) after its last start-of-scan (FFDA)."""
    if data.endswith(b"\xff\xd9"):  # the usual end: no need to scan the file for its last scan
        return False
    sos = data.rfind(b"\xff\xda")
    return sos < 0 or data.find(b"\xff\xd9", sos) < 0


def is_jpeg(data: bytes) -> bool:
    """A JPEG with an end-of-image marker after its last scan (what :func:`decode_jpegs` is handed)."""
    return data[:2] == b"\xff\xd8" and not _jpeg_truncated(data)


def as_tensor(data: bytes) -> torch.Tensor:
    """Encoded bytes as the uint8 tensor :func:`decode_jpegs` takes (a writable copy: torch warns on bytes)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_image(data: bytes, upright: bool = False, reduce: int = 1) -> np.ndarray:
    """Encoded bytes → RGB uint8 ``(H, W, 3)``.

    Grayscale, CMYK, 16-bit and alpha images are converted by OpenCV (alpha is dropped, 16-bit
    scaled to 8). EXIF orientation is ignored, so pixel coordinates match COCO's annotations and
    fixation data, unless ``upright``: then the image is turned as viewers show it (a phone's photo).
    ``reduce`` (2, 4 or 8): decoded at that fraction of its size (a JPEG by libjpeg's DCT scaling, which
    skips most of the decoding; ceil(side / reduce) each side), for :func:`decode_at_least`.
    """
    if not data:
        raise ImageError("empty file")
    if data[:2] == b"\xff\xd8" and _jpeg_truncated(data):
        raise ImageError("truncated JPEG (no end-of-image marker after the last scan)")
    stated = stated_size(data)
    if stated is not None:
        scale = reduce if data[:2] == b"\xff\xd8" else 1  # (libjpeg decodes at the fraction; others decode whole)
        if -(-stated[0] // scale) * -(-stated[1] // scale) > DECODE_PIXELS:
            raise ImageError(f"image too large ({stated[1]}×{stated[0]}, {stated[0] * stated[1] / 1e6:.0f} "
                             f"megapixels; at most {DECODE_PIXELS / 1e6:.0f} are decoded)")
    flags = _REDUCED[reduce] if upright else _REDUCED[reduce] | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        bgr = opencv().imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:  # e.g. a header that states more pixels than OpenCV decodes (MAX_PIXELS)
        raise ImageError(f"cannot decode (OpenCV: {' '.join(str(e).split()).split(' error: ', 1)[-1][:200]})") from None
    if bgr is None:
        raise ImageError("cannot decode (not an image OpenCV can read, or corrupt)")
    h, w = bgr.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageError(f"image too small ({w}×{h}); the smallest side must be at least {MIN_SIDE} px")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


#: the most pixels OpenCV decodes (its ``OPENCV_IO_MAX_IMAGE_PIXELS``, 2^30 unless set); a bigger image is refused
MAX_PIXELS = int(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", 1 << 30))
#: the most pixels :func:`decode_image` turns out (2^27: 134 megapixels, a 108 MP phone photo whole): a 1 MB PNG
#: that states 2^30 pixels is 3 GB decoded, and ``predict`` maps it at full size (it ran out of 21 GB); a JPEG
#: decoded at a fraction (:func:`decode_at_least`) counts at that fraction. Checked from the sizes headers state
#: (:func:`stated_size`), so an image of a format whose header is not read is decoded up to :data:`MAX_PIXELS`
DECODE_PIXELS = min(MAX_PIXELS, 1 << 27)
_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # markers without a segment (TEM, RSTn)
_FRAMES = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """A JPEG's (H, W) as its frame header (SOFn) states it, read without decoding; None where the bytes hold
    no frame header before the first scan (or are no JPEG)."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    for _ in range(4096):  # markers and fill bytes read; a real header has a few dozen
        if i + 4 > n:
            return None
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
        elif marker in _NO_LENGTH:
            i += 2
        elif marker in _FRAMES:
            if i + 9 > n:
                return None
            h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return (h, w) if h and w else None
        elif marker in (0xD8, 0xD9, 0xDA):  # SOI again, EOI or a scan before any frame
            return None
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """A TIFF's (H, W) as its first image's tags (ImageLength, ImageWidth) state them; None where they do not read."""
    order = {b"II*\0": "little", b"MM\0*": "big"}.get(data[:4])
    if order is None:
        return None
    def number(at: int, size: int) -> int:
        return int.from_bytes(data[at:at + size], order)
    ifd, found = number(4, 4), {}
    for at in range(ifd + 2, min(ifd + 2 + 12 * number(ifd, 2), len(data) - 11), 12):  # 12-byte entries
        if number(at, 2) in (256, 257):  # ImageWidth, ImageLength: a SHORT (3) or a LONG
            found[number(at, 2)] = number(at + 8, 2 if number(at + 2, 2) == 3 else 4)
    return (found[257], found[256]) if found.get(256) and found.get(257) else None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """A WebP's (H, W) as its first chunk states it (lossy VP8, lossless VP8L, or the extended format's canvas)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP" or len(data) < 25:
        return None
    kind = data[12:16]
    if kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a" and len(data) >= 30:
        return int.from_bytes(data[28:30], "little") & 0x3FFF, int.from_bytes(data[26:28], "little") & 0x3FFF
    if kind == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if kind == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[27:30], "little") + 1, int.from_bytes(data[24:27], "little") + 1
    return None


def stated_size(data: bytes) -> tuple[int, int] | None:
    """(H, W) as a JPEG's frame header, a PNG's IHDR, or a BMP's, TIFF's or WebP's header states it, read without
    decoding: a small compressed file may state gigabytes. None for other bytes, or no such header. (A ``.npy`` is
    not compressed: its bytes bound what it loads, and a header stating more fails to load.)"""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    if data[:2] == b"BM" and len(data) >= 26:  # BITMAPCOREHEADER (12 bytes): 16-bit sides; the others: 32-bit
        core = int.from_bytes(data[14:18], "little") == 12
        w, h = (int.from_bytes(data[18:20], "little"), int.from_bytes(data[20:22], "little")) if core else (
            int.from_bytes(data[18:22], "little", signed=True), abs(int.from_bytes(data[22:26], "little", signed=True)))
        return (h, w) if h > 0 and w > 0 else None  # (a negative height: rows stored top-down)
    return jpeg_size(data) or _webp_size(data) or _tiff_size(data)


def decodable_size(data: bytes) -> bool:
    """The JPEG's header states its size, and no more than :data:`MAX_PIXELS` (what a GPU decoder is handed: it
    would allocate whatever the header asks for)."""
    dims = jpeg_size(data)
    return dims is not None and dims[0] * dims[1] <= MAX_PIXELS


def decode_at_least(data: bytes, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`decode_image` of a photo that is to be shrunk to at most ``size`` = (H, W), and its full (H, W). A
    JPEG at least twice ``size`` on both sides is decoded at 1/2, 1/4 or 1/8 of its size (the most that keeps
    both sides at least ``size``) by libjpeg's DCT scaling: a 640×480 COCO photo going to 256×192 costs 1.85×
    less CPU, decoded and area-resized (1.40 against 2.59 ms on one core of the 2-core sandbox), and its
    resized pixels differ from the full decode's by about one grey level on average. Other images are
    decoded whole, and so is one whose header states more than :data:`MAX_PIXELS` (which OpenCV then
    refuses, as it does on the other paths)."""
    dims = jpeg_size(data)
    reduce = next((r for r in (8, 4, 2) if dims and dims[0] >= r * size[0] and dims[1] >= r * size[1]
                   and min(size) >= MIN_SIDE and dims[0] * dims[1] <= MAX_PIXELS), 1)
    if reduce > 1:
        rgb = decode_image(data, reduce=reduce)
        if rgb.shape[:2] == (-(-dims[0] // reduce), -(-dims[1] // reduce)):  # the header told the truth
            return rgb, dims
    rgb = decode_image(data)
    return rgb, rgb.shape[:2]


#: largest image file read by default (a bigger file is a per-image failure, not a memory blow-up)
MAX_IMAGE_BYTES = 64 * 1024**2


OUTSIDE = ("outside the image folder (a symlink or path leading out of it; --allow-outside-root labels it anyway, "
           "with --retry-failed once its shard is finished)")


def _within(real: str, root: str) -> bool:
    """``real`` (a real path) lies in ``root``; a name that is no path (``pipe:[…]``, a socket's) does not."""
    return os.path.isabs(real) and os.path.commonpath([real, root]) == root


_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
#: ``O_PATH`` where the real path of an open file can be read back (Linux's ``/proc/self/fd``), else 0
_O_PATH = getattr(os, "O_PATH", 0) if os.path.isdir("/proc/self/fd") else 0


def _open_inside(path: str, root: str) -> int:
    """A file descriptor for reading ``path``, which must lie in ``root``: what is checked is the file that is
    opened, so a symlink or a folder swapped for one after the listing cannot lead out of it, and a file out of
    it is never opened for reading (a FIFO's writer is not woken, a device not touched). On Linux the path is
    first opened with ``O_PATH`` (naming the file, reading nothing), its real path read from
    ``/proc/self/fd``, then the file reopened through that descriptor; elsewhere the path is resolved, then
    opened."""
    if not _O_PATH:
        if not _within(os.path.realpath(path), root):
            raise ImageError(OUTSIDE)
        return os.open(path, _FLAGS)
    handle = os.open(path, _O_PATH | getattr(os, "O_CLOEXEC", 0))
    try:
        if not _within(os.readlink(f"/proc/self/fd/{handle}"), root):
            raise ImageError(OUTSIDE)
        return os.open(f"/proc/self/fd/{handle}", _FLAGS)
    finally:
        os.close(handle)


def read_file(path: str, max_bytes: int | None = MAX_IMAGE_BYTES, root: str | None = None) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``. A FIFO, device or socket is refused at
    once (opened non-blocking, never read), so a bad path can neither hang nor read forever.

    ``root`` (a real path): the file must lie in that folder (:func:`_open_inside`)."""
    return read_source(path, max_bytes, root)[0]


def content_digest(data: bytes) -> str:
    """What a labelled image's bytes are recorded as (BLAKE2b, 128 bits, hex): a later run tells a file replaced
    by another of the same size by it."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_source(path: str, max_bytes: int | None = MAX_IMAGE_BYTES,
                root: str | None = None) -> tuple[bytes, os.stat_result]:
    """:func:`read_file`, and the file's ``stat`` as it was opened (its size and modification time)."""
    try:
        fd = _open_inside(path, root) if root is not None else os.open(path, _FLAGS)
    except FileNotFoundError:
        if root is not None and not _within(os.path.realpath(path), root):  # a broken link that would lead out
            raise ImageError(f"file not found: {os.path.realpath(path)} (a symlink's target, where it is one)") \
                from None
        if os.path.islink(path):  # a broken link in the folder
            raise ImageError(f"file not found: {path} is a symlink to {os.path.realpath(path)}, which does not "
                             "exist") from None
        raise ImageError("file not found") from None
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or type(e).__name__}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise ImageError(f"file too large ({st.st_size} bytes; the limit is {max_bytes}, --max-image-bytes)")
        data = _read_fd(fd, st.st_size, max_bytes)
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or type(e).__name__}") from None
    finally:
        os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:  # grew while we read it
        raise ImageError(f"file too large (more than {max_bytes} bytes, --max-image-bytes)")
    return data, st


def _read_fd(fd: int, size: int, max_bytes: int | None) -> bytes:
    """Up to ``max_bytes + 1`` bytes of an open file (to tell one that grew past the limit), in as few
    ``read`` calls as its size allows: each call lets other threads take the interpreter lock, and a
    labelling worker reads many files at once."""
    chunks, total, want = [], 0, size + 1
    while True:
        if max_bytes is not None:
            want = min(want, max_bytes + 1 - total)
        if want <= 0:
            break
        chunk = os.read(fd, want)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        want = 1 << 20
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_image(path: str, max_bytes: int | None = MAX_IMAGE_BYTES, upright: bool = False) -> np.ndarray:
    return decode_image(read_file(path, max_bytes), upright=upright)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to exactly ``size`` = (H, W); area filter along a side that shrinks, bilinear along one that grows.

    OpenCV's area filter averages only when both sides shrink: a portrait photo into a landscape input (640×480
    into DeepGaze's 384×512) shrinks its height while its width grows, so that side is shrunk first, alone."""
    cv2 = opencv()
    h, w = size
    height, width = image.shape[:2]
    if (height, width) == (h, w):
        return image
    if h < height and w > width:
        image = cv2.resize(image, (width, h), interpolation=cv2.INTER_AREA)
    elif w < width and h > height:
        image = cv2.resize(image, (w, height), interpolation=cv2.INTER_AREA)
    shrinking = h * w < image.shape[0] * image.shape[1]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def encode_jpeg(rgb: np.ndarray, quality: int, bgr: bool = False) -> bytes:
    """RGB (or, with ``bgr``, BGR: OpenCV's order, no conversion) uint8 ``(H, W, 3)`` → JPEG bytes."""
    cv2 = opencv()
    ok, buf = cv2.imencode(".jpg", rgb if bgr else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageError("JPEG encoding failed")
    return buf.tobytes()


def encode_png(gray: np.ndarray) -> bytes:
    cv2 = opencv()
    ok, buf = cv2.imencode(".png", gray)
    if not ok:
        raise ImageError("PNG encoding failed")
    return buf.tobytes()


def decode_jpegs(datas: list[bytes | torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """JPEGs (bytes, or :func:`as_tensor` of them) → RGB uint8 ``[3, H, W]`` tensors on ``device`` (nvJPEG
    on a GPU, one batched call), EXIF orientation ignored as in :func:`decode_image`; None for an image the
    device cannot decode (or too small), which the caller decodes on the CPU instead."""
    from torchvision.io import ImageReadMode, decode_jpeg  # here: torchvision's import takes a second
    tensors = [d if isinstance(d, torch.Tensor) else as_tensor(d) for d in datas]

    def decode() -> list:
        try:
            return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        except (RuntimeError, ValueError, TypeError):  # one bad image fails the whole batched call (and
            # torchvision before 0.19 takes no list): decode them one at a time
            out = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
                except (RuntimeError, ValueError):
                    out.append(None)
            return out

    if device.type == "cuda":
        decoded = _on_a_stream_of_its_own(decode, device)
    else:
        decoded = decode()
    return [x if x is not None and x.ndim == 3 and x.shape[0] == 3 and min(x.shape[1:]) >= MIN_SIDE else None
            for x in decoded]


_DECODE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _on_a_stream_of_its_own(decode, device: torch.device) -> list:
    """Run torchvision's GPU decode so that it cannot write into memory the caller's stream still uses.

    nvJPEG writes its images on a stream of its own, into tensors torchvision allocates on the stream that is
    current, without waiting for that stream. Memory freed there by work still queued (the previous batch's
    teacher input and activations, while the GPU runs that batch) can be handed out again at once, and the
    decoder then overwrites it under the running teacher: on an H100 a whole batch of SalGAN maps came out
    NaN in one run of two. Allocated while a stream of ours is current, the images come from memory only
    that stream reuses; each is marked as used by the caller's stream, which waits for the decode."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    caller = torch.cuda.current_stream(device)
    side = _DECODE_STREAMS.get(device)
    if side is None:
        side = _DECODE_STREAMS[device] = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        decoded = decode()
    caller.wait_stream(side)
    for x in decoded:
        if x is not None:
            x.record_stream(caller)
    return decoded


#: images of one shape resized in one call at most (bounds the float copy a GPU resize makes)
RESIZE_GROUP = 64


def _resize_batch(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[n, 3, h, w]`` uint8 → ``[n, 3, H, W]`` uint8 on its device (see :func:`resize_tensor`)."""
    h, w = size
    if tuple(x.shape[-2:]) == (h, w):
        return x
    shrinking = h * w < x.shape[-2] * x.shape[-1]
    if x.device.type == "cpu":  # PyTorch has a uint8 kernel on the CPU
        return F.interpolate(x, size=(h, w), mode="bilinear", antialias=shrinking, align_corners=False)
    y = F.interpolate(x.float(), size=(h, w), mode="bilinear", antialias=shrinking, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def resize_tensor(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[3, h, w]`` uint8 → ``[3, H, W]`` uint8 on its device: antialiased bilinear when shrinking (close to
    :func:`resize`'s area filter), bilinear when enlarging."""
    return _resize_batch(image[None], size)[0]


def resize_tensors(images: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
    """:func:`resize_tensor` of every image, with the same values, those of one shape resized together: a
    batch of photos holds a few shapes, so a GPU runs a few resizes per batch instead of one per image."""
    out: list[torch.Tensor | None] = [None] * len(images)
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(i)
    for index in by_shape.values():
        for k in range(0, len(index), RESIZE_GROUP):
            part = index[k:k + RESIZE_GROUP]
            for i, resized in zip(part, _resize_batch(torch.stack([images[i] for i in part]), size)):
                out[i] = resized
    return out
