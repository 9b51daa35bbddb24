"""The GAN route's host-side randomness: a seed's labels and z are a published contract (the same seed gives
the same images across releases), so they are pinned here; a change of mapping must be a deliberate one."""

from __future__ import annotations

import numpy as np

from service.families.gan import draw, pixels


def test_seed_maps_to_pinned_labels_and_z():
    labels, z = draw(0, 3, 4)
    assert labels.dtype == np.int64 and labels.tolist() == [8, 6, 5]
    assert z.dtype == np.float32 and z.shape == (3, 4)
    np.testing.assert_allclose(z, [[0.640423, 0.1049, -0.535669, 0.361595],
                                   [1.304, 0.947081, -0.703735, -1.265422],
                                   [-0.623274, 0.041326, -2.325031, -0.218792]], atol=1e-6)
    labels, z = draw(2**53 - 1, 2, 2)
    assert labels.tolist() == [0, 7]
    np.testing.assert_allclose(z, [[1.405477, 0.318416], [0.41599, -1.426455]], atol=1e-6)


def test_given_labels_and_truncation_leave_z_direction_alone():
    _, z = draw(0, 3, 4)
    labels, z_half = draw(0, 3, 4, truncation=0.5, labels=[1, 2, 3])
    assert labels.tolist() == [1, 2, 3]
    np.testing.assert_allclose(z_half, 0.5 * z, rtol=1e-6)
    assert draw(0, 3, 4, labels=7)[0].tolist() == [7, 7, 7]


def test_pixels_maps_tanh_range_to_bytes():
    image = np.array([-1.0, -0.5, 0.0, 0.999, 1.0], np.float32).reshape(1, 1, 1, 5)
    out = pixels(image)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 5)
    assert out.ravel().tolist() == [0, 64, 128, 255, 255]
