import hashlib
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from train.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    denormalize,
    eval_transform,
    normalize,
    pcg64_state,
    run_eval_transform,
    sample_seed,
    train_transform,
)

SIZE = 64


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A non-square image with structure (gradients) plus noise, so that crops and flips all differ."""
    rng = np.random.default_rng(0)
    h, w = 90, 130
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], axis=2)
    noise = rng.integers(0, 40, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("preset", ["standard", "notebook", "none"])
def test_presets_give_hwc_uint8_of_requested_size(image, preset):
    out = Augment(train_transform(preset, SIZE))(image, seed=3)
    assert out.shape == (SIZE, SIZE, 3)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous


@pytest.mark.parametrize("preset", ["standard", "notebook"])
def test_same_seed_same_bytes_regardless_of_history(image, preset):
    augment = Augment(train_transform(preset, SIZE))
    first = augment(image, seed=7)
    for other in range(20):
        augment(image, seed=other)
    assert augment(image, seed=7).tobytes() == first.tobytes()
    fresh = Augment(train_transform(preset, SIZE))
    assert fresh(image, seed=7).tobytes() == first.tobytes()


def test_same_seed_same_bytes_after_pickle_and_in_another_process(image):
    augment = Augment(train_transform("standard", SIZE))
    for other in range(5):
        augment(image, seed=other)  # the pickled copy carries this history; it must not matter
    expected = [augment(image, seed=s).tobytes() for s in (11, 12)]
    clone = pickle.loads(pickle.dumps(augment))
    assert [clone(image, seed=s).tobytes() for s in (11, 12)] == expected
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        remote = [pool.submit(augment, image, s).result(timeout=60).tobytes() for s in (12, 11)]
    assert remote[::-1] == expected


def test_different_seeds_differ_for_standard(image):
    augment = Augment(train_transform("standard", SIZE))
    outputs = {augment(image, seed=s).tobytes() for s in range(10)}
    assert len(outputs) == 10


def test_two_augments_sharing_one_compose_stay_deterministic(image):
    shared = train_transform("standard", SIZE)
    first, second = Augment(shared), Augment(shared)
    alone = Augment(train_transform("standard", SIZE))
    assert [first(image, seed=s).tobytes() for s in (1, 2)] == [alone(image, seed=s).tobytes() for s in (1, 2)]
    second(image, seed=9)
    assert first(image, seed=1).tobytes() == alone(image, seed=1).tobytes()


def test_numpy_generator_state_is_seeded_apart():
    """Augment sets PCG64 states itself (splitmix64): nearby seeds must give unrelated, uniform draws."""
    draws = []
    for seed in range(2000):
        generator = np.random.Generator(np.random.PCG64())
        generator.bit_generator.state = pcg64_state(seed)
        draws.append(generator.random(2))
    draws = np.array(draws)
    assert len({tuple(d) for d in draws}) == 2000
    assert abs(draws.mean() - 0.5) < 0.02 and abs(draws.std() - 12 ** -0.5) < 0.02
    assert abs(np.corrcoef(draws[:-1, 0], draws[1:, 0])[0, 1]) < 0.1  # seed s vs seed s + 1
    assert pcg64_state(7) == pcg64_state(7) and pcg64_state(7)["state"]["inc"] % 2 == 1


def test_flip_and_colour_jitter_are_drawn_independently():
    """Seeding each transform separately (Compose.set_random_seed) makes every transform see the same first
    draw, so flip (p=0.5) and colour jitter (p=0.5) would always happen together; the shared state must not."""
    h, w = 90, 130
    xx = np.tile(np.arange(w) * 255 // w, (h, 1))
    image = np.stack([xx, xx, np.full_like(xx, 128)], axis=2).astype(np.uint8)
    augment = Augment(train_transform("standard", SIZE))
    flipped, jittered = [], []
    for seed in range(100):
        out = augment(image, seed=seed).astype(int)
        flipped.append(out[:, : SIZE // 2, 0].mean() > out[:, SIZE // 2 :, 0].mean())
        jittered.append(np.abs(out[..., 2] - 128).max() > 1)  # channel 2 is flat 128 unless colours change
    flipped, jittered = np.array(flipped), np.array(jittered)
    assert 0.3 < flipped.mean() < 0.7
    assert 0.3 < jittered.mean() < 0.7
    assert 0.25 < (flipped == jittered).mean() < 0.75


def test_eval_transform_is_deterministic_centre_crop():
    # 100 x 200 image whose pixel value encodes its column; short side -> round(64 / 0.5) = 128,
    # so the image becomes 128 x 256 and the crop keeps columns 96..159 and rows 32..95.
    h, w = 100, 200
    columns = np.tile(np.arange(w, dtype=np.uint8)[None, :, None], (h, 1, 3))
    rows = np.tile(np.arange(h, dtype=np.uint8)[:, None, None], (1, w, 3))
    image = np.concatenate([columns[:, :, :2], rows[:, :, :1]], axis=2)
    augment = Augment(eval_transform(SIZE, crop_pct=0.5))
    out = augment(image, seed=1)
    assert out.shape == (SIZE, SIZE, 3)
    assert augment(image, seed=999).tobytes() == out.tobytes()
    # scale 1.28: output column j of the crop maps to source column (96 + j + 0.5) / 1.28 - 0.5
    expected_cols = (96 + np.arange(SIZE) + 0.5) / 1.28 - 0.5
    expected_rows = (32 + np.arange(SIZE) + 0.5) / 1.28 - 0.5
    np.testing.assert_allclose(out[SIZE // 2, :, 0], expected_cols, atol=1.0)
    np.testing.assert_allclose(out[:, SIZE // 2, 2], expected_rows, atol=1.0)


def test_eval_transform_rejects_bad_crop_pct():
    with pytest.raises(UserError):
        eval_transform(SIZE, crop_pct=1.5)


def test_eval_transform_uses_the_weights_resize_filter():
    """A model's metadata names its resize filter (timm's pretrained_cfg, torchvision's transforms): bicubic
    gives other pixels than the default bilinear (the same as before for bilinear); an unknown name is refused."""
    noise = np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8)
    bilinear = Augment(eval_transform(SIZE, 0.875))(noise, 0)
    assert Augment(eval_transform(SIZE, 0.875, "bilinear"))(noise, 0).tobytes() == bilinear.tobytes()
    assert Augment(eval_transform(SIZE, 0.875, "bicubic"))(noise, 0).tobytes() != bilinear.tobytes()
    with pytest.raises(UserError, match="interpolation 'sinc'"):
        eval_transform(SIZE, 0.875, "sinc")
    # what evaluate and predict apply: the run's recorded filter; a run saved before it was recorded, bilinear
    meta = {"image_size": SIZE, "crop_pct": 0.875}
    assert run_eval_transform(meta)(noise, 0).tobytes() == bilinear.tobytes()
    bicubic = run_eval_transform({**meta, "interpolation": "bicubic"})(noise, 0)
    assert bicubic.tobytes() == Augment(eval_transform(SIZE, 0.875, "bicubic"))(noise, 0).tobytes()


def test_grayscale_input_becomes_three_equal_channels(image):
    gray = image[:, :, 0].copy()
    for preset in ("standard", "notebook", "none"):
        out = Augment(train_transform(preset, SIZE))(gray, seed=5)
        assert out.shape == (SIZE, SIZE, 3)
        assert out.dtype == np.uint8
        if preset != "standard":  # colour jitter (saturation) may legitimately be a no-op on gray
            assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(UserError, match="standard.*notebook.*none"):
        train_transform("fancy", SIZE)


def test_sample_seed_is_sha256_based_stable_and_varies():
    digest = hashlib.sha256(b"0:3:cub_000017").digest()
    assert sample_seed(0, 3, "cub_000017") == int.from_bytes(digest[:4], "little")
    assert 0 <= sample_seed(5, 1, "x") < 2**32
    seeds = {sample_seed(0, epoch, key) for epoch in range(3) for key in ("a", "b", "c")}
    assert len(seeds) == 9
    assert sample_seed(1, 0, "a") != sample_seed(0, 0, "a")


def test_normalize_matches_manual_and_is_channels_last():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    out = normalize(images)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = (images.float() / 255 - mean) / std
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected)
    assert torch.isfinite(out).all()


def test_denormalize_inverts_normalize():
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    torch.testing.assert_close(denormalize(normalize(images)), images.float() / 255, atol=1e-6, rtol=0)


def test_normalize_refuses_float_input():
    with pytest.raises(ValueError):
        normalize(torch.zeros(1, 3, 2, 2))
