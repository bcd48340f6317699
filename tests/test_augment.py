"""Batch affine augmentation: identity when disabled, exact on whole-pixel shifts, seeded."""
import numpy as np

from pipeline.augment import ELASTIC_GRID, bilinear_sample, random_affine, upsample_matrix


def images(n=4, seed=0):
    return np.random.default_rng(seed).random((n, 28, 28, 1), dtype=np.float32)


def test_no_rotation_zoom_or_shift_is_identity():
    x = images()
    out = random_affine(x, np.random.default_rng(1), rotate_deg=0, zoom=0, shift=0)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, x, atol=1e-6)


def test_whole_pixel_shift_moves_pixels_and_fills_zero():
    x = images(1)
    yy, xx = np.meshgrid(np.arange(28, dtype=np.float32), np.arange(28, dtype=np.float32), indexing="ij")
    out = bilinear_sample(x, (yy - 2)[None], (xx + 3)[None])  # output (i, j) reads source (i-2, j+3)
    np.testing.assert_allclose(out[0, 2:, :25], x[0, :26, 3:], atol=1e-6)
    assert np.all(out[0, :2] == 0) and np.all(out[0, :, 25:] == 0)


def test_same_seed_same_batch_and_bounded_values():
    x = images()
    a = random_affine(x, np.random.default_rng(5))
    b = random_affine(x, np.random.default_rng(5))
    c = random_affine(x, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 + 1e-6


def test_digit_mass_stays_roughly_in_place_under_default_ranges():
    x = np.zeros((64, 28, 28, 1), np.float32)
    x[:, 10:18, 12:16] = 1.0
    out = random_affine(x, np.random.default_rng(0))
    ratio = out.sum(axis=(1, 2, 3)) / x.sum(axis=(1, 2, 3))
    assert np.all((ratio > 0.7) & (ratio < 1.35))  # zoom +-10 % changes area by at most ~21 %


def test_independent_zoom_changes_the_aspect_ratio_and_keeps_the_default_draws():
    x = np.zeros((256, 28, 28, 1), np.float32)
    x[:, 8:20, 8:20] = 1.0  # a square
    same = random_affine(x, np.random.default_rng(3), rotate_deg=0, shift=0, zoom=0.1)
    both = random_affine(x, np.random.default_rng(3), rotate_deg=0, shift=0, zoom=0.1, zoom_xy=True)

    def aspect(imgs):
        cols = (imgs[..., 0] > 0.5).any(axis=1).sum(axis=1)
        rows = (imgs[..., 0] > 0.5).any(axis=2).sum(axis=1)
        return rows / cols

    assert np.all(np.abs(aspect(same) - 1) < 0.1)
    assert np.abs(aspect(both) - 1).max() > 0.12  # heights and widths zoomed apart
    # the shared draws (angle, zoom, shift) come first, so the default path is unchanged
    np.testing.assert_array_equal(same, random_affine(x, np.random.default_rng(3), rotate_deg=0, shift=0, zoom=0.1))


def test_upsample_matrix_interpolates_between_control_points_and_keeps_constants():
    m = upsample_matrix(28, ELASTIC_GRID)
    assert m.shape == (28, ELASTIC_GRID)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(m @ np.arange(ELASTIC_GRID), np.linspace(0, ELASTIC_GRID - 1, 28), atol=1e-5)
    assert m[0, 0] == 1.0 and m[-1, -1] == 1.0


def test_elastic_warp_moves_pixels_by_at_most_its_bound_and_is_seeded():
    x = np.zeros((200, 28, 28, 1), np.float32)
    x[:, 14, 14] = 1.0  # one bright pixel in the middle
    plain = random_affine(x, np.random.default_rng(7), rotate_deg=0, zoom=0, shift=0)
    warped = random_affine(x, np.random.default_rng(7), rotate_deg=0, zoom=0, shift=0, elastic=2.0)
    np.testing.assert_allclose(plain, x, atol=1e-6)  # elastic=0 is the identity here
    np.testing.assert_array_equal(warped, random_affine(x, np.random.default_rng(7), rotate_deg=0, zoom=0,
                                                        shift=0, elastic=2.0))
    lit = warped[..., 0] > 0
    yy, xx = np.nonzero(lit.any(axis=0))
    # every output pixel that reads the dot lies within the bound (+1 for the bilinear footprint)
    assert np.abs(yy - 14).max() <= 3 and np.abs(xx - 14).max() <= 3
    moved = [(np.abs(np.nonzero(img[..., 0] == img[..., 0].max())[0] - 14).max() > 0) for img in warped]
    assert np.mean(moved) > 0.3  # the field does move the dot in many images
    assert not np.allclose(warped, plain)


def test_elastic_zero_draws_exactly_as_before():
    x = images(8)
    np.testing.assert_array_equal(random_affine(x, np.random.default_rng(2), zoom_xy=True),
                                  random_affine(x, np.random.default_rng(2), zoom_xy=True, elastic=0.0))
