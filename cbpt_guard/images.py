"""Decoding image files the way every part of cbpt-guard reads them: whole, upright, and at
their true brightness, or not at all."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PNG colour type -> channels (docs: PNG spec, IHDR)
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


class TruncatedImage(ValueError):
    pass


class TooManyPixels(ValueError):
    pass


class NotAnImage(ValueError):
    pass


def _png_shortfall(data: bytes) -> int:
    """Bytes of pixel data a non-interlaced PNG promises in its header but does not hold
    (0 for a complete one, or one this check cannot judge). Pillow decodes such a file as if
    the missing rows were black."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return 0
    pos, idat, header = 8, zlib.decompressobj(), None
    produced = 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR" and len(body) >= 13:
            header = struct.unpack(">IIBBBBB", body[:13])
        elif kind == b"IDAT":
            try:
                while body:
                    produced += len(idat.decompress(body, 1 << 20))
                    body = idat.unconsumed_tail
            except zlib.error:
                return 0  # Pillow reports a corrupt stream itself
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or header[6] != 0 or header[3] not in _PNG_CHANNELS:
        return 0  # interlaced or unusual: left to Pillow
    w, h, depth, colour = header[0], header[1], header[2], header[3]
    expected = h * (1 + (w * depth * _PNG_CHANNELS[colour] + 7) // 8)
    return max(0, expected - produced)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) greyscale, scaled to 8 bits: Pillow's own conversion to RGB
    clips everything above 255 to white."""
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        return img
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) <= 65535 else float(arr.max())
    return Image.fromarray(np.rint(np.clip(arr, 0, top) * (255.0 / top)).astype(np.uint8), mode="L")


def decode(data: bytes | str | Path, max_pixels: int | None = None) -> Image.Image:
    """Decode an image fully, applying its EXIF orientation (as a camera shows it); refuse one
    of more than `max_pixels` pixels before decoding it (a decompression bomb), and one whose
    pixel data is cut short (`TruncatedImage`)."""
    if not isinstance(data, (bytes, bytearray)) and not Path(data).is_file():
        raise ValueError(f"{data} is not a regular file")  # a FIFO or device would block for ever
    raw = data if isinstance(data, (bytes, bytearray)) else Path(data).read_bytes()
    try:
        img = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as e:  # Pillow's own bound, far above ours
        raise TooManyPixels(f"image has more pixels than the limit ({e})") from None
    except UnidentifiedImageError:  # Pillow's message names a memory address, not the file
        raise NotAnImage("not an image file Pillow can read (unknown format, or corrupt header)") from None
    with img:
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise TooManyPixels(f"image has {img.width}x{img.height} pixels, more than the limit of {max_pixels}")
        missing = _png_shortfall(bytes(raw)) if img.format == "PNG" else 0
        if missing:
            raise TruncatedImage(f"truncated image: {missing} bytes of its pixel data are missing")
        img.load()
        return _to_8bit(ImageOps.exif_transpose(img))
