"""On-the-fly augmentation: one random resampling per image (rotation, zoom, shift, optionally an elastic
warp), bilinear.

Vectorized over the batch with the array module of the images (NumPy or CuPy). The random draws come from
a NumPy Generator, so the same seed gives the same batch on CPU and GPU.
"""
import numpy as np

from pipeline.nn.backend import get_array_module


# Control points per side of the elastic warp: 4 x 4 points 9 pixels apart on a 28-pixel image, so the
# displacement field varies smoothly over about a stroke's length (Simard et al. 2003 smooth a per-pixel
# random field with a Gaussian of sigma 4 pixels for the same reason).
ELASTIC_GRID = 4


def random_affine(x, rng, rotate_deg=10.0, zoom=0.1, shift=0.1, zoom_xy=False, elastic=0.0):
    """Randomly rotate (+-rotate_deg), zoom (1 +- zoom) and shift (+- shift * size) every image.

    x: (N, H, W, C) float array in NHWC; returns a new array of the same shape and dtype.
    Pixels that map from outside the image are 0 (background). zoom_xy: draw the horizontal and vertical
    zoom independently, as Keras' ImageDataGenerator(zoom_range=...) does (the aspect ratio changes too).
    elastic: also move every pixel by a continuous random field, at most `elastic` pixels along each axis
    (an elastic distortion in the manner of Simard et al. 2003, from ELASTIC_GRID^2 control points).
    """
    xp = get_array_module(x)
    n, h, w, c = x.shape
    angle = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg, n))
    scale = 1.0 + rng.uniform(-zoom, zoom, n)
    tx = rng.uniform(-shift, shift, n) * w
    ty = rng.uniform(-shift, shift, n) * h
    scale_y = 1.0 + rng.uniform(-zoom, zoom, n) if zoom_xy else scale  # drawn last: zoom_xy=False draws as before
    # Inverse map: output pixel -> source pixel, about the image centre.
    cos, sin = np.cos(angle), np.sin(angle)
    inv = np.stack([np.stack([cos / scale, sin / scale], 1), np.stack([-sin / scale_y, cos / scale_y], 1)], 1)
    inv = inv.astype(x.dtype)  # (N, 2, 2)
    inv = xp.asarray(inv)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    gy, gx = xp.meshgrid(xp.arange(h, dtype=x.dtype) - cy, xp.arange(w, dtype=x.dtype) - cx, indexing="ij")
    oy = gy[None] - xp.asarray(ty.astype(x.dtype))[:, None, None]
    ox = gx[None] - xp.asarray(tx.astype(x.dtype))[:, None, None]
    sx = inv[:, 0, 0, None, None] * ox + inv[:, 0, 1, None, None] * oy + cx
    sy = inv[:, 1, 0, None, None] * ox + inv[:, 1, 1, None, None] * oy + cy
    if elastic:  # drawn after everything else, so elastic=0 draws exactly as before
        grid = rng.uniform(-elastic, elastic, (2, n, ELASTIC_GRID, ELASTIC_GRID)).astype(x.dtype)
        up_y, up_x = xp.asarray(upsample_matrix(h, ELASTIC_GRID)), xp.asarray(upsample_matrix(w, ELASTIC_GRID))
        field = up_y @ xp.asarray(grid) @ up_x.T  # (2, N, H, W), continuous, linear between control points
        sy = sy + field[0]
        sx = sx + field[1]
    return bilinear_sample(x, sy, sx)


def upsample_matrix(size, points, dtype=np.float32):
    """(size, points): linear interpolation from `points` evenly spaced values to `size` pixels, corners
    included; each row sums to 1, so a field of equal control values stays that value everywhere."""
    pos = np.linspace(0.0, points - 1.0, size)
    low = np.minimum(np.floor(pos).astype(int), points - 2)
    frac = pos - low
    m = np.zeros((size, points), dtype)
    m[np.arange(size), low] = 1.0 - frac
    m[np.arange(size), low + 1] = frac
    return m


def bilinear_sample(x, sy, sx):
    """Sample x (N, H, W, C) at float coordinates sy, sx (N, H', W'); zero outside the image."""
    xp = get_array_module(x)
    n, h, w, c = x.shape
    y0 = xp.floor(sy).astype(np.int32)
    x0 = xp.floor(sx).astype(np.int32)
    wy = (sy - y0).astype(x.dtype)[..., None]
    wx = (sx - x0).astype(x.dtype)[..., None]
    # A zero border of one pixel makes out-of-range corners read 0 without masks.
    padded = xp.zeros((n, h + 2, w + 2, c), dtype=x.dtype)
    padded[:, 1:-1, 1:-1] = x
    flat = padded.reshape(n * (h + 2) * (w + 2), c)
    base = (xp.arange(n, dtype=np.int64) * (h + 2) * (w + 2))[:, None, None]

    def corner(yy, xx):
        inside = (yy >= -1) & (yy <= h) & (xx >= -1) & (xx <= w)
        yy = xp.clip(yy + 1, 0, h + 1)
        xx = xp.clip(xx + 1, 0, w + 1)
        vals = flat[(base + yy * (w + 2) + xx).reshape(-1)].reshape(yy.shape + (c,))
        return vals * inside[..., None].astype(x.dtype)

    top = corner(y0, x0) * (1 - wx) + corner(y0, x0 + 1) * wx
    bottom = corner(y0 + 1, x0) * (1 - wx) + corner(y0 + 1, x0 + 1) * wx
    return (top * (1 - wy) + bottom * wy).astype(x.dtype, copy=False)
