"""Image URLs of a request -> Pillow images, within the server's limits.

`data:` URLs (base64) in the formats below; remote `http(s)` URLs only when the server was started with
`--allow-remote-images` (off by default: a public server fetching arbitrary URLs is a request forger),
then fetched with a timeout and the body-size limit. The pixel limit is checked on the header, before
the pixels are decoded. Every failure is an ApiError(400) naming the problem.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.request
from dataclasses import dataclass

from sasa_patcher.serving.protocol import ApiError, invalid

MEDIA_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}
REMOTE_TIMEOUT_S = 10


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int  # width x height of one image, as sent (before the model's own resize)
    max_bytes: int  # one fetched remote image
    allow_remote: bool = False


def unsupported(message: str) -> ApiError:
    return invalid(message, "messages", code="unsupported_image")


def load_image(url: str, limits: ImageLimits):
    """The decoded image of one `image_url`."""
    if url.startswith("data:"):
        media_type, data = _parse_data_url(url)
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote:
            raise invalid("remote image URLs are disabled on this server: send the image inline as a "
                          "data:image/png;base64,... URL (or start the server with --allow-remote-images)",
                          "messages", code="remote_images_disabled")
        media_type, data = _fetch(url, limits.max_bytes)
    else:
        raise unsupported("an image URL must be a data: URL (data:image/png;base64,...) or an http(s) URL")
    expected = MEDIA_TYPES.get(media_type)
    if expected is None:
        raise unsupported(f"unsupported image type {media_type!r}: send one of {', '.join(sorted(MEDIA_TYPES))}")
    return _decode(data, expected, limits.max_pixels)


def _parse_data_url(url: str) -> tuple[str, bytes]:
    header, comma, payload = url[len("data:"):].partition(",")
    parameters = header.split(";")
    if not comma or parameters[-1] != "base64":
        raise invalid("an image data: URL must be base64: data:image/png;base64,...", "messages",
                      code="invalid_image")
    try:
        return parameters[0].strip().lower(), base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("the image data: URL is not valid base64", "messages", code="invalid_image") from None


def _fetch(url: str, max_bytes: int) -> tuple[str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as response:  # noqa: S310 - http(s) only
            data = response.read(max_bytes + 1)
            media_type = response.headers.get_content_type()
    except OSError as error:
        raise invalid(f"cannot fetch the image {url}: {error}", "messages", code="invalid_image") from None
    if len(data) > max_bytes:
        raise invalid(f"the image at {url} exceeds {max_bytes} bytes", "messages", code="image_too_large")
    return media_type, data


def _decode(data: bytes, expected: str, max_pixels: int):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise invalid("the image cannot be decoded (damaged, or not an image)", "messages",
                      code="invalid_image") from None
    if image.format != expected:
        raise unsupported(f"the image is {image.format}, not the {expected} its media type says")
    if image.width * image.height > max_pixels:
        raise invalid(f"the image has {image.width}x{image.height} pixels; the limit is {max_pixels} "
                      "(--max-image-pixels): send a smaller image", "messages", code="image_too_large")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise invalid("the image cannot be decoded (damaged or truncated)", "messages", code="invalid_image") from None
    return image
