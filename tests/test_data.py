import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from realfake.config import SplitConfig, TrainConfig
from realfake.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FaceDataset,
    decode_on_device,
    eval_transform,
    load_for_eval,
    normalize_batch,
    read_for_device,
    train_transform,
)
from realfake.errors import DatasetError, OutsideDataRoots
from realfake.samples import discover, ensure_inside, group_of, stratified_split
from tests.conftest import FACES


def _touch_image(path: Path, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (120, 30, 200)).save(path)


def test_discovers_kaggle_layout_recursively_images_only(tmp_path):
    _touch_image(tmp_path / "training_real" / "real_00001.jpg")
    _touch_image(tmp_path / "training_real" / "nested" / "deeper" / "real_00002.png")
    _touch_image(tmp_path / "training_fake" / "easy_1_0001.jpg")
    _touch_image(tmp_path / "training_fake" / "hard_2_1100.JPEG")
    (tmp_path / "training_fake" / "notes.txt").write_text("not an image")
    _touch_image(tmp_path / "unrelated" / "x.jpg")  # neither real nor fake: ignored

    samples = discover(tmp_path)

    assert [(s.path, s.label, s.group) for s in samples] == [
        ("training_fake/easy_1_0001.jpg", 1, "easy"),
        ("training_fake/hard_2_1100.JPEG", 1, "hard"),
        ("training_real/nested/deeper/real_00002.png", 0, "real"),
        ("training_real/real_00001.jpg", 0, "real"),
    ]


def test_discovers_plain_real_fake_layout(synthetic_data):
    counts = Counter(s.label for s in discover(synthetic_data))
    assert counts == {0: 100, 1: 100}


def test_missing_class_is_rejected_with_a_message(tmp_path):
    _touch_image(tmp_path / "real" / "a.jpg")
    (tmp_path / "fake").mkdir()
    with pytest.raises(DatasetError, match="no images of class 'fake'"):
        discover(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        discover(tmp_path / "nope")


def test_symlink_leading_out_of_the_folder_is_not_read(tmp_path):
    outside = tmp_path / "outside.jpg"
    _touch_image(outside)
    root = tmp_path / "data"
    _touch_image(root / "real" / "a.jpg")
    _touch_image(root / "fake" / "b.jpg")
    (root / "fake" / "escape.jpg").symlink_to(outside)
    assert [s.path for s in discover(root)] == ["fake/b.jpg", "real/a.jpg"]
    with pytest.raises(OutsideDataRoots):
        ensure_inside(root / "fake" / "escape.jpg", [root])


def test_group_prefix():
    assert group_of("easy_116_1110.jpg") == "easy"
    assert group_of("real_00001.jpg") == "real"
    assert group_of("IMG1234.jpg") is None


def test_split_is_deterministic_whatever_the_listing_order(synthetic_data):
    samples = discover(synthetic_data)
    shuffled = samples[:]
    random.Random(7).shuffle(shuffled)
    config = SplitConfig(val=0.15, test=0.2, seed=3)
    assert stratified_split(samples, config) == stratified_split(shuffled, config)
    assert stratified_split(samples, config) != stratified_split(samples, SplitConfig(val=0.15, test=0.2, seed=4))


def test_split_is_stratified_disjoint_and_complete(synthetic_data):
    samples = discover(synthetic_data)
    parts = stratified_split(samples, SplitConfig(val=0.1, test=0.2, seed=0))
    paths = [s.path for part in parts.values() for s in part]
    assert len(paths) == len(set(paths)) == len(samples)
    strata = Counter((s.label, s.group) for s in samples)
    for (label, group), n in strata.items():
        per_part = {name: sum(1 for s in part if (s.label, s.group) == (label, group)) for name, part in parts.items()}
        assert per_part["test"] == round(n * 0.2)
        assert per_part["val"] == round(n * 0.1)
        assert per_part["train"] == n - per_part["test"] - per_part["val"]


def test_folds_deal_the_faces_outside_test_into_disjoint_stratified_folds(synthetic_data):
    samples = discover(synthetic_data)
    split = SplitConfig(test=0.2, seed=3, folds=3)
    folds = [stratified_split(samples, split, fold) for fold in range(3)]
    plain = stratified_split(samples, SplitConfig(val=0.1, test=0.2, seed=3))
    outside_test = set(samples) - set(plain["test"])
    for parts in folds:
        assert parts["test"] == plain["test"]  # the same held-out faces as without folds
        assert set(parts["train"]) == outside_test - set(parts["val"])
    vals = [set(parts["val"]) for parts in folds]
    assert set.union(*vals) == outside_test and sum(map(len, vals)) == len(outside_test)  # each face once
    for stratum in {(s.label, s.group) for s in samples}:
        counts = [sum((s.label, s.group) == stratum for s in val) for val in vals]
        assert max(counts) - min(counts) <= 1
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    assert stratified_split(samples, SplitConfig(test=0.2, seed=4, folds=3), 0)["val"] != folds[0]["val"]
    for config, fold in [(split, None), (split, 3), (SplitConfig(test=0.2), 0)]:
        with pytest.raises(ValueError, match=f"fold {fold} does not fit folds={config.folds}"):
            stratified_split(samples, config, fold)


def test_train_fraction_keeps_a_nested_stratified_share_of_training_and_leaves_val_and_test(synthetic_data):
    samples = discover(synthetic_data)
    whole = stratified_split(samples, SplitConfig(test=0.2, seed=3, folds=3), 1)
    shares = {f: stratified_split(samples, SplitConfig(test=0.2, seed=3, folds=3, train_fraction=f), 1)
              for f in (0.25, 0.5)}
    for fraction, parts in shares.items():
        assert parts["val"] == whole["val"] and parts["test"] == whole["test"]
        strata = Counter((s.label, s.group) for s in whole["train"])
        kept = Counter((s.label, s.group) for s in parts["train"])
        assert kept == {key: max(1, round(n * fraction)) for key, n in strata.items()}
    assert set(shares[0.25]["train"]) < set(shares[0.5]["train"]) < set(whole["train"])
    assert stratified_split(samples, SplitConfig(test=0.2, seed=3, folds=3, train_fraction=1.0), 1) == whole
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="train_fraction"):
            SplitConfig(train_fraction=bad)


@pytest.mark.skipif(not FACES.is_dir(), reason="shared dataset not present")
def test_split_of_the_real_faces_keeps_group_proportions():
    samples = discover(FACES)
    assert len(samples) == 1633
    assert Counter(s.group for s in samples) == {"real": 865, "mid": 384, "easy": 192, "hard": 192}
    parts = stratified_split(samples, SplitConfig(val=0.1, test=0.2, seed=0))
    test_groups = Counter(s.group for s in parts["test"])
    assert test_groups == {"real": 173, "mid": 77, "easy": 38, "hard": 38}


def test_too_few_images_for_the_split(tmp_path):
    _touch_image(tmp_path / "real" / "a.jpg")
    _touch_image(tmp_path / "fake" / "b.jpg")
    with pytest.raises(DatasetError, match="too few images"):
        stratified_split(discover(tmp_path), SplitConfig(val=0.2, test=0.2))


def test_transforms_shapes_and_eval_is_deterministic(synthetic_data):
    config = TrainConfig(resize=72, image_size=64, jpeg_quality=(30, 60), jpeg_p=1.0)
    samples = discover(synthetic_data)[:2]
    train = FaceDataset(synthetic_data, samples, train_transform(config))
    evaluation = FaceDataset(synthetic_data, samples, eval_transform(config))
    image, label, index = train[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert (label, index) == (samples[0].label, 0)
    assert torch.equal(evaluation[1][0], evaluation[1][0])
    torch.manual_seed(0)
    first = train[1][0]
    assert not torch.equal(first, train[1][0])  # augmentation draws anew


def test_train_transform_includes_the_seed_augmentation():
    names = [type(t).__name__ for t in train_transform(TrainConfig()).transforms]
    for expected in ("Resize", "RandomRotation", "RandomCrop", "ColorJitter", "Normalize"):
        assert expected in names
    assert "RandomApply" not in names  # JPEG re-encoding only when asked for
    eval_names = [type(t).__name__ for t in eval_transform(TrainConfig()).transforms]
    assert "CenterCrop" in eval_names and "RandomRotation" not in eval_names


def test_without_rotation_jitter_or_jpeg_a_full_size_training_crop_is_the_face_or_its_mirror():
    # forensic cues sit in single pixels: turning every augmentation off must leave them as they are
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8))
    config = TrainConfig(resize=32, image_size=32, rotation=0, color_jitter=0)
    names = [type(t).__name__ for t in train_transform(config).transforms]
    assert "RandomRotation" not in names and "ColorJitter" not in names
    plain = eval_transform(config)(image)
    torch.manual_seed(0)
    views = [train_transform(config)(image) for _ in range(20)]
    assert all(torch.equal(v, plain) or torch.equal(v, plain.flip(-1)) for v in views)
    assert any(torch.equal(v, plain.flip(-1)) for v in views)


def test_crop_within_keeps_training_crops_inside_the_centre_square():
    """A blue 32-px centre inside a red 64-px face: with crop_within 32 no 16-px training crop
    ever shows red; without it, some do. A window outside image_size..resize is refused."""
    face = np.zeros((64, 64, 3), np.uint8)
    face[..., 0] = 255
    face[16:48, 16:48] = (0, 0, 255)
    image = Image.fromarray(face)

    def shows_red(config):  # red normalises to a positive first channel, blue to a negative one
        return [bool((train_transform(config)(image)[0] > 0).any()) for _ in range(200)]

    settings = dict(resize=64, image_size=16, rotation=0, color_jitter=0)
    torch.manual_seed(0)
    assert not any(shows_red(TrainConfig(**settings, crop_within=32)))
    assert any(shows_red(TrainConfig(**settings)))
    with pytest.raises(ValueError, match="crop_within 8 must lie between image_size 16 and resize 64"):
        TrainConfig(**settings, crop_within=8)


def test_crop_grid_starts_every_training_and_evaluation_crop_on_the_grid(tmp_path):
    """A 64-px face whose pixels say where they are (red: column, green: row): with crop_grid 8,
    16-px training crops inside the centre 40 start at 8, 16, 24, 32 (the window begins at 12,
    rounded down to 8), each offset drawn; the evaluation crop starts at 24 (the centre, 24);
    24-px ones at 16 where CenterCrop's start at 20, in every decoding path, which also agree
    with CenterCrop off the grid where the margin is odd. Rotation, which
    resamples, is refused, and so is a crop size a mirror would take off the grid."""
    columns, rows = np.meshgrid(np.arange(64) * 4, np.arange(64) * 4)
    image = torch.from_numpy(np.stack([columns, rows, np.zeros_like(rows)]).astype(np.uint8))

    def start(view):  # undo Normalize, read back the top-left pixel's row and column
        pixels = view * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        coordinates = (pixels[:2] * 255 / 4).round().int()
        return int(coordinates[1].min()), int(coordinates[0].min())

    settings = dict(resize=64, rotation=0, color_jitter=0, crop_grid=8)
    train = train_transform(TrainConfig(**settings, image_size=16, crop_within=40), resized=True)
    torch.manual_seed(0)
    starts = {start(train(image)) for _ in range(300)}
    assert starts == {(top, left) for top in (8, 16, 24, 32) for left in (8, 16, 24, 32)}
    assert start(eval_transform(TrainConfig(**settings, image_size=16), resized=True)(image)) == (24, 24)
    assert start(eval_transform(TrainConfig(**settings, image_size=24), resized=True)(image)) == (16, 16)
    off_grid = TrainConfig(**(settings | {"crop_grid": 1}), image_size=24)
    assert start(eval_transform(off_grid, resized=True)(image)) == (20, 20)

    face = Image.fromarray(image.permute(1, 2, 0).numpy())
    face.save(tmp_path / "face.png")
    face.save(tmp_path / "face.jpg", quality=100)
    on_grid = TrainConfig(**settings, image_size=24)
    odd_margin = TrainConfig(**(settings | {"crop_grid": 1}), image_size=25)  # CenterCrop: 19.5 rounds to 20
    for config in (on_grid, off_grid, odd_margin):  # scoring's paths cut the same pixels
        expected, crop, grid = eval_transform(config)(face), config.eval_crop, config.crop_grid
        fast = normalize_batch([load_for_eval(tmp_path / "face.png", 64, crop, grid)])[0]
        torch.testing.assert_close(fast, expected, rtol=0, atol=1e-5)
        jpeg = tmp_path / "face.jpg"
        [(on_device, error)] = decode_on_device([(jpeg, read_for_device(jpeg, 64, crop, grid))],
                                                torch.device("cpu"), 64, crop, grid)
        assert error is None and start(normalize_batch([on_device.permute(1, 2, 0).numpy()])[0]) == start(expected)
    with pytest.raises(ValueError, match="crop_grid 8 keeps the crops on the JPEG block grid, which rotation 15"):
        TrainConfig(resize=64, image_size=16, crop_grid=8)
    with pytest.raises(ValueError, match="image_size 20 is not a multiple of crop_grid 8"):
        TrainConfig(**settings, image_size=20)


def test_decoded_cache_matches_decoding_and_is_reused_until_a_file_changes(synthetic_data, tmp_path):
    import os

    from realfake.data import DecodedCache

    data = tmp_path / "data"
    import shutil

    shutil.copytree(synthetic_data, data)
    config = TrainConfig(resize=72, image_size=64)
    samples = discover(data)[:10]
    cache = DecodedCache(tmp_path / "cache", data, samples, config).ensure()
    assert (cache.dir / "complete").exists() and len(list(cache.dir.glob("*.npy"))) == 10
    cached = FaceDataset(data, samples, eval_transform(config, resized=True), cache)
    decoded = FaceDataset(data, samples, eval_transform(config))
    for index in range(10):
        assert torch.equal(cached[index][0], decoded[index][0])

    stamp = (cache.dir / "0.npy").stat().st_mtime_ns
    again = DecodedCache(tmp_path / "cache", data, samples, config).ensure()
    assert again.dir == cache.dir and (again.dir / "0.npy").stat().st_mtime_ns == stamp  # reused, not rebuilt

    changed = data / samples[3].path
    Image.new("RGB", (64, 64), (255, 0, 0)).save(changed)
    os.utime(changed, ns=(1, 1))
    rebuilt = DecodedCache(tmp_path / "cache", data, samples, config).ensure()
    assert rebuilt.dir != cache.dir
    red = rebuilt.load(3)
    assert red.shape == (3, 72, 72) and red[0].float().mean() > 250 and red[1].float().mean() < 5
    assert DecodedCache(tmp_path / "cache", data, samples, TrainConfig(resize=96, image_size=64)).dir != cache.dir


def test_batched_jpeg_decoding_on_a_device_matches_the_pil_path(tmp_path):
    """decode_on_device is the GPU scoring path (nvJPEG); on the CPU device it must give the
    pixels load_for_eval gives, EXIF orientation included, and keep other formats on PIL."""
    rng = np.random.default_rng(0)
    pixels = (rng.random((48, 80, 3)) * 255).astype(np.uint8)
    pixels = np.asarray(Image.fromarray(pixels).resize((160, 96), Image.BILINEAR))  # smooth, so JPEG keeps it
    Image.fromarray(pixels).save(tmp_path / "wide.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90°
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    Image.fromarray(pixels).save(tmp_path / "lossless.png")
    paths = [tmp_path / name for name in ("wide.jpg", "rotated.jpg", "lossless.png")]

    items = [(path, read_for_device(path, 72, 64)) for path in paths]
    assert [isinstance(data, torch.Tensor) for _, data in items] == [True, True, False]  # JPEG bytes, PNG pixels
    decoded = decode_on_device(items, torch.device("cpu"), 72, 64)

    for path, (image, error) in zip(paths, decoded):
        assert error is None and image.dtype == torch.uint8 and image.shape == (3, 64, 64)
        expected = torch.tensor(load_for_eval(path, 72, 64)).permute(2, 0, 1).float()
        assert (image.float() - expected).abs().mean() < 4, path.name  # resize kernels differ slightly
    assert (decoded[0][0].float() - decoded[1][0].float()).abs().mean() > 20  # the rotation was applied


def test_a_scoring_batch_is_normalised_as_the_eval_transform_normalises_on_the_models_device():
    """Scoring sends uint8 pixels to the model's device and normalises them there: the batch
    must hold what torchvision's ToDtype + Normalize give each image, channels-last."""
    from torchvision.transforms import v2

    from realfake.data import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(0)
    pixels = [(rng.random((40, 40, 3)) * 255).astype(np.uint8) for _ in range(3)]
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = torch.stack([reference(torch.from_numpy(p).permute(2, 0, 1)) for p in pixels])

    for device in (None, torch.device("cpu")):
        batch = normalize_batch(pixels, device)
        assert batch.dtype == torch.float32 and batch.shape == (3, 3, 40, 40)
        assert batch.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(batch, expected, rtol=0, atol=1e-5)


def test_edited_regions_come_from_a_fake_file_name():
    from realfake.samples import REGIONS, Sample, edited_regions

    assert REGIONS == ("left_eye", "right_eye", "nose", "mouth")
    assert edited_regions(Sample("training_fake/mid_12_0110.jpg", 1, "mid")) == (0.0, 1.0, 1.0, 0.0)
    assert edited_regions(Sample("training_real/real_00012.jpg", 0, "real")) == (0.0, 0.0, 0.0, 0.0)
    assert edited_regions(Sample("fake/easy_00012.jpg", 1, "easy")) is None  # the name does not say
    assert edited_regions(Sample("fake/hard_1_0120.jpg", 1, "hard")) is None


def test_a_spliced_face_changes_only_around_its_eyes_nose_and_mouth():
    from realfake.data import splice_parts

    face = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 120, 100), np.uint8))
    for seed in range(20):
        torch.manual_seed(seed)
        fake = splice_parts(face)
        assert fake.shape == face.shape and fake.dtype == torch.uint8
        changed = (fake != face).any(dim=0)
        assert changed.float().mean() > 0.01  # at least one part was pasted
        # above the eyes, and at the sides of the face, nothing moves
        assert not changed[: int(0.25 * 120)].any()
        assert not changed[:, : int(0.1 * 100)].any() and not changed[:, int(0.9 * 100):].any()
    torch.manual_seed(7)
    first = splice_parts(face)
    torch.manual_seed(7)
    assert torch.equal(splice_parts(face), first)  # torch's generator decides, so a seeded run repeats


def test_splice_p_replaces_fake_items_by_pasted_real_faces_labelled_fake(synthetic_data, tmp_path):
    from realfake.data import DecodedCache

    config = TrainConfig(resize=64, image_size=64)
    samples = discover(synthetic_data)[::10]
    real_images = [eval_transform(config)(Image.open(synthetic_data / s.path).convert("RGB"))
                   for s in samples if s.label == 0]
    cache = DecodedCache(tmp_path, synthetic_data, samples, config).ensure()
    for dataset in (FaceDataset(synthetic_data, samples, eval_transform(config), splice_p=1.0),
                    FaceDataset(synthetic_data, samples, eval_transform(config, resized=True), cache, splice_p=1.0)):
        torch.manual_seed(0)
        for index, sample in enumerate(samples):
            image, label, _ = dataset[index]
            own = eval_transform(config)(Image.open(synthetic_data / sample.path).convert("RGB"))
            assert label == sample.label
            if sample.label == 0:
                assert torch.equal(image, own)  # real faces stay as they are
            else:  # a real face with parts pasted: its top rows are a real face's, the rest differs
                assert any(torch.equal(image[:, :12], real[:, :12]) for real in real_images)
                assert not any(torch.equal(image, real) for real in real_images)
    plain = FaceDataset(synthetic_data, samples, eval_transform(config))
    fake_index = next(i for i, s in enumerate(samples) if s.label == 1)
    own = eval_transform(config)(Image.open(synthetic_data / samples[fake_index].path).convert("RGB"))
    assert torch.equal(plain[fake_index][0], own)  # off by default


def test_splice_p_is_a_probability_and_excludes_region_supervision():
    assert TrainConfig(splice_p=0.5).splice_p == 0.5
    with pytest.raises(ValueError, match="less than or equal to 1"):
        TrainConfig(splice_p=1.5)
    with pytest.raises(ValueError, match="splice_p and region_weight exclude each other"):
        TrainConfig(splice_p=0.5, region_weight=0.5)


def test_erase_p_blanks_one_rectangle_of_a_training_crop_to_the_mean_colour():
    image = Image.fromarray(np.random.default_rng(0).integers(1, 255, (32, 32, 3), np.uint8))
    config = TrainConfig(resize=32, image_size=32, rotation=0, color_jitter=0, erase_p=1.0)
    plain = eval_transform(config)(image)
    torch.manual_seed(0)
    for _ in range(10):
        view = train_transform(config)(image)
        erased = (view == 0).all(dim=0)  # no 8-bit value normalises to exactly 0: the means are not multiples of 1/255
        rows, cols = erased.nonzero(as_tuple=True)
        assert 0.02 * 32 * 32 <= erased.sum() <= 0.34 * 32 * 32
        box = erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all()  # one rectangle
        mirrored = not torch.equal(view[:, ~erased], plain[:, ~erased])
        assert torch.equal(view[:, ~erased], (plain.flip(-1) if mirrored else plain)[:, ~erased])
    assert "RandomErasing" not in [type(t).__name__ for t in train_transform(TrainConfig()).transforms]
    with pytest.raises(ValueError):
        TrainConfig(erase_p=1.5)
