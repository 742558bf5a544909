"""Loaders on miniature official layouts, the synthetic generator, sampling and clip augmentation."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
import torch

from reid.keypoints import COCO_KEYPOINTS
from training.datasets import build_dataset, ilidsvid_splits
from training.records import keypoint_cache_path
from training.sampling import RandomIdentitySampler, test_clip_indices, train_clip_indices
from training.synthetic import (Appearance, Camera, SyntheticConfig, ensure_synthetic, generate_synthetic,
                                render_tracklet)
from training.transforms import ClipDataset, ClipTransform, collate_clips

KP = {name: i for i, name in enumerate(COCO_KEYPOINTS)}


def _image(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((8, 4, 3), value, np.uint8))


def _mars_tree(root: Path) -> None:
    """Train: pid 7 (2 tracklets, cams 1 and 2; names listed out of frame order), pid 3, junk.
    Test: pid 5 in cams 1/2 (query cam 1), distractor pid 0, junk pid -1."""
    train = [("0007C1T0001", [3, 1, 2], 7, 1), ("0007C2T0001", [1, 2], 7, 2), ("0003C1T0001", [1], 3, 1),
             ("00-1C1T0001", [1, 2], -1, 1)]
    test = [("0005C1T0001", [2, 10, 1], 5, 1), ("0005C2T0001", [1, 2], 5, 2), ("0000C3T0001", [1], 0, 3),
            ("00-1C2T0001", [1], -1, 2), ("0005C1T0002", [1], 5, 1)]
    for split, home, tracks in (("train", "bbox_train", train), ("test", "bbox_test", test)):
        names, rows = [], []
        for prefix, frames, pid, cam in tracks:
            start = len(names) + 1
            for f in frames:
                name = f"{prefix}F{f:03d}.jpg"
                _image(root / home / prefix[:4] / name)
                names.append(name)
            rows.append([start, len(names), pid, cam])
        (root / "info").mkdir(parents=True, exist_ok=True)
        (root / "info" / f"{split}_name.txt").write_text("\n".join(names) + "\n")
        scipy.io.savemat(str(root / "info" / f"tracks_{split}_info.mat"), {f"track_{split}_info": np.array(rows)})
    scipy.io.savemat(str(root / "info" / "query_IDX.mat"), {"query_IDX": np.array([[1]])})


def test_mars_layout_junk_distractors_sorting_and_gallery_modes(tmp_path):
    _mars_tree(tmp_path)
    kp_path = keypoint_cache_path(tmp_path, "yolo-pose", "bbox_train/0007/0007C1T0001F001")
    kp_path.parent.mkdir(parents=True)
    np.save(kp_path, np.zeros((3, 17, 3), np.float32))
    ds = build_dataset("mars", tmp_path, keypoints="yolo-pose")
    assert len(ds.train) == 3 and sorted({r.pid for r in ds.train}) == [0, 1] and ds.num_train_pids == 2
    first = next(r for r in ds.train if r.key == "bbox_train/0007/0007C1T0001F001")
    assert [Path(f).name for f in first.frames] == [f"0007C1T0001F00{i}.jpg" for i in (1, 2, 3)]
    assert first.keypoints == str(kp_path) and first.camid == 0
    assert all(r.keypoints is None for r in ds.train if r is not first)
    assert [(r.pid, r.camid) for r in ds.query] == [(5, 0)]
    assert [Path(f).name for f in ds.query[0].frames][-1] == "0005C1T0001F010.jpg"  # numeric, not glob order
    assert sorted((r.pid, r.camid) for r in ds.gallery) == [(0, 2), (5, 0), (5, 1)]  # junk dropped, distractor kept
    assert ds.num_cameras == 3
    full = build_dataset("mars", tmp_path, gallery="all")
    assert len(full.gallery) == 4 and ds.query[0].frames in {r.frames for r in full.gallery}


def test_mars_errors_name_the_problem(tmp_path):
    _mars_tree(tmp_path)
    with pytest.raises(ValueError, match="gallery mode"):
        build_dataset("mars", tmp_path, gallery="matlab")
    (tmp_path / "info" / "query_IDX.mat").unlink()
    with pytest.raises(FileNotFoundError, match="query_IDX.mat"):
        build_dataset("mars", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("market", tmp_path)


def _ilidsvid_tree(root: Path, numbers: list[int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    for number in numbers:
        for cam in (1, 2):
            for frame in (9, 10, 100, 11):  # unpadded: lexicographic order would be wrong
                _image(root / "i-LIDS-VID" / "sequences" / f"cam{cam}" / f"person{number:03d}" /
                       f"cam{cam}_person{number:03d}_{frame}.png")
    ls_set = np.stack([rng.permutation(len(numbers)) + 1 for _ in range(10)])
    split_dir = root / "train-test people splits"
    split_dir.mkdir(parents=True)
    scipy.io.savemat(str(split_dir / "train_test_splits_ilidsvid.mat"), {"ls_set": ls_set})
    return ls_set


def test_ilidsvid_all_ten_splits(tmp_path):
    numbers = [1, 2, 4, 7, 8, 12]  # gaps, as in the real data: ls_set indexes sorted folders, not numbers
    ls_set = _ilidsvid_tree(tmp_path, numbers)
    splits = ilidsvid_splits(tmp_path)
    assert len(splits) == 10
    for split in range(10):
        ds = build_dataset("ilidsvid", tmp_path, split=split)
        test_numbers = sorted(numbers[i - 1] for i in ls_set[split, :3])  # first half = test (torchreid)
        assert sorted(r.pid for r in ds.query) == test_numbers == sorted(r.pid for r in ds.gallery)
        assert {r.camid for r in ds.query} == {0} and {r.camid for r in ds.gallery} == {1}
        assert len(ds.train) == 6 and ds.num_train_pids == 3 and {r.camid for r in ds.train} == {0, 1}
        assert sorted({r.pid for r in ds.train}) == [0, 1, 2]
        for record in ds.train + ds.query:
            assert [Path(f).stem.rsplit("_", 1)[1] for f in record.frames] == ["9", "10", "11", "100"]
    with pytest.raises(ValueError, match="split 10 out of range"):
        build_dataset("ilidsvid", tmp_path, split=10)


def test_ilidsvid_camera_mismatch_is_reported(tmp_path):
    _ilidsvid_tree(tmp_path, [1, 2])
    _image(tmp_path / "i-LIDS-VID" / "sequences" / "cam1" / "person003" / "a_1.png")
    with pytest.raises(ValueError, match="differ between cam1 and cam2"):
        build_dataset("ilidsvid", tmp_path)


SMALL = dict(num_ids=8, family_size=4, num_cameras=2, min_frames=3, max_frames=5, num_distractors=2, num_junk=1)


def _uniform_camera(h=128, w=64) -> Camera:
    return Camera(background=np.zeros((h, w, 3), np.float32), gain=np.ones(3, np.float32), person_height=0.85,
                  facing_front=True, noise=0.0, blur=False)


def _look() -> Appearance:
    return Appearance(skin=(200, 160, 120), hair=(40, 30, 20), shirt=(0, 0, 255), stripes=None,
                      sleeves=(0, 255, 0), trousers=(255, 255, 0), shoes=(255, 0, 255),
                      height_scale=1.0, width_scale=1.0, leg_ratio=0.5)


@pytest.mark.parametrize("layout", ["mars", "ilidsvid"])
def test_synthetic_dataset_loads_with_keypoints_on_the_body(tmp_path, layout):
    root = tmp_path / layout
    generate_synthetic(root, layout=layout, **SMALL)
    ds = build_dataset("synthetic", root, layout=layout, **SMALL)
    assert ds.train and ds.query and ds.gallery
    assert all(r.keypoints is not None for r in ds.train + ds.query + ds.gallery)
    if layout == "mars":
        assert {r.pid for r in ds.gallery} >= {0} and -1 not in {r.pid for r in ds.gallery}
    for record in ds.train[:4]:
        kp = np.load(record.keypoints)
        assert kp.shape == (len(record.frames), 17, 3) and kp.dtype == np.float32
        frame = cv2.imread(record.frames[0])
        visible = kp[0, kp[0, :, 2] > 0]
        assert len(visible) >= 14
        assert (visible[:, 0] >= 0).all() and (visible[:, 0] <= frame.shape[1] - 1).all()
    with pytest.raises(ValueError, match="different config"):
        ensure_synthetic(root, layout=layout, **{**SMALL, "seed": 1})
    with pytest.raises(FileExistsError):
        generate_synthetic(root, layout=layout, **SMALL)


def test_synthetic_is_deterministic(tmp_path):
    a = generate_synthetic(tmp_path / "a", **SMALL)
    generate_synthetic(tmp_path / "b", **SMALL)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.npy"))
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.npy"))
    for rel in files_a:
        np.testing.assert_array_equal(np.load(tmp_path / "a" / rel), np.load(tmp_path / "b" / rel))
    assert a == SyntheticConfig(**SMALL)


def test_rendered_keypoints_lie_on_the_drawn_body():
    config = SyntheticConfig(**SMALL)
    frames, keypoints = render_tracklet(config, _uniform_camera(), _look(), 6, np.random.default_rng(0))
    for frame, kp in zip(frames, keypoints):
        for x, y, score in kp:
            if score > 0:
                assert frame[int(round(y)), int(round(x))].sum() > 0, "keypoint on the (black) background"
        # sleeves are green, trousers yellow: the part keypoints sit on their own garment
        for name in ("left_elbow", "right_elbow"):
            x, y = np.round(kp[KP[name], :2]).astype(int)
            assert tuple(frame[y, x]) == (0, 255, 0)
        for name in ("left_knee", "right_knee"):
            x, y = np.round(kp[KP[name], :2]).astype(int)
            assert tuple(frame[y, x]) == (255, 255, 0)


def test_train_clip_indices_one_per_segment_and_padding():
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = train_clip_indices(17, 4, rng)
        bounds = np.linspace(0, 17, 5).astype(int)
        assert all(bounds[i] <= idx[i] < bounds[i + 1] for i in range(4))
    assert train_clip_indices(2, 4, rng).tolist() == [0, 1, 1, 1]
    assert train_clip_indices(4, 4, rng).tolist() == [0, 1, 2, 3]


def test_test_clip_indices_cover_all_frames_and_repeat_the_last():
    clips = test_clip_indices(10, 4)
    assert clips.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 9]]
    assert test_clip_indices(4, 4).tolist() == [[0, 1, 2, 3]]
    assert test_clip_indices(1, 4).tolist() == [[0, 0, 0, 0]]


def _records(counts: dict[int, int]):
    from training.records import TrackletRecord
    return [TrackletRecord(frames=(f"{pid}_{i}.jpg",), pid=pid, camid=i % 2) for pid, n in counts.items()
            for i in range(n)]


def test_identity_sampler_batches_p_identities_with_k_tracklets():
    records = _records({0: 9, 1: 4, 2: 2, 3: 6, 4: 1, 5: 5})
    sampler = RandomIdentitySampler(records, P=3, K=4, seed=1)
    batches = list(sampler)
    assert 0 < len(batches) <= len(sampler)
    for batch in batches:
        assert len(batch) == 12
        groups = [batch[i:i + 4] for i in range(0, 12, 4)]
        pids = [{records[j].pid for j in group} for group in groups]
        assert all(len(p) == 1 for p in pids) and len(set().union(*pids)) == 3
    again = RandomIdentitySampler(records, P=3, K=4, seed=1)
    assert list(again) == batches  # deterministic per (seed, epoch)
    assert list(again) != batches  # the next epoch differs
    again.set_epoch(0)
    assert list(again) == batches
    with pytest.raises(ValueError, match="only 6"):
        RandomIdentitySampler(records, P=7, K=4)


def _marked_frame(h=128, w=64):
    frame = np.zeros((h, w, 3), np.uint8)
    kp = np.zeros((17, 3), np.float32)
    kp[KP["left_wrist"]] = (50, 60, 1)
    kp[KP["right_wrist"]] = (12, 60, 1)
    frame[58:63, 48:53] = (255, 0, 0)  # red block around the left wrist
    frame[58:63, 10:15] = (0, 0, 255)  # blue block around the right wrist
    return frame, kp


def test_flip_keeps_keypoints_on_the_mirrored_parts():
    frame, kp = _marked_frame()
    transform = ClipTransform(size=(256, 128), flip_prob=1.0, pad=0, erase_prob=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    frames, keypoints, erased = transform([frame], kp[None], np.random.default_rng(0))
    image = frames[0].permute(1, 2, 0).numpy()
    # after the mirror, what was the left wrist looks like a right wrist: relabelled, on the red block
    x, y = np.round(keypoints[0, KP["right_wrist"], :2].numpy()).astype(int)
    assert image[y, x].tolist() == [1.0, 0.0, 0.0]
    x, y = np.round(keypoints[0, KP["left_wrist"], :2].numpy()).astype(int)
    assert image[y, x].tolist() == [0.0, 0.0, 1.0]
    assert not erased.any()


def test_pad_crop_shifts_keypoints_and_drops_those_outside():
    frame, kp = _marked_frame()
    kp[KP["nose"]] = (0, 64, 1)  # on the left border: some crops push it out
    transform = ClipTransform(size=(128, 64), flip_prob=0.0, pad=10, erase_prob=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    dropped = 0
    for seed in range(20):
        frames, keypoints, _ = transform([frame, frame], np.stack([kp, kp]), np.random.default_rng(seed))
        image = frames[1].permute(1, 2, 0).numpy()
        x, y = np.round(keypoints[1, KP["left_wrist"], :2].numpy()).astype(int)
        assert image[y, x].tolist() == [1.0, 0.0, 0.0]
        np.testing.assert_array_equal(keypoints[0], keypoints[1])  # one crop for the whole clip
        nose = keypoints[0, KP["nose"]]
        if nose[2] == 0:
            dropped += 1
            assert nose.tolist() == [0.0, 0.0, 0.0]  # missing keypoints are all zeros
        else:
            assert 0 <= nose[0] <= 63
    assert 0 < dropped < 20


def test_random_erasing_flags_the_erased_frames():
    frames = [np.full((32, 16, 3), 128, np.uint8)] * 4
    kp = np.zeros((4, 17, 3), np.float32)
    always = ClipTransform(size=(32, 16), pad=0, flip_prob=0.0, erase_prob=1.0)
    out, _, erased = always(frames, kp, np.random.default_rng(0))
    assert erased.all() and all((out[t] != out[t].flatten()[0]).any() for t in range(4))
    never = ClipTransform(size=(32, 16), pad=0, flip_prob=0.0, erase_prob=0.0)
    out, _, erased = never(frames, kp, np.random.default_rng(0))
    assert not erased.any() and torch.allclose(out, torch.full_like(out, 128 / 255 * 2 - 1), atol=1e-6)


def test_clip_dataset_train_and_test_modes(tmp_path):
    root = tmp_path / "syn"
    ds = build_dataset("synthetic", root, **SMALL)
    torch.manual_seed(0)
    train = ClipDataset(ds.train, mode="train", T=4, size=(64, 32))
    batch = collate_clips([train[i] for i in range(3)])
    assert batch["frames"].shape == (3, 4, 3, 64, 32) and batch["keypoints"].shape == (3, 4, 17, 3)
    assert batch["erased"].dtype == torch.bool and batch["pid"].dtype == torch.int64
    test = ClipDataset(ds.query, mode="test", T=4, size=(64, 32))
    assert len(test) == sum(-(-len(r.frames) // 4) for r in ds.query)
    record = ds.query[0]
    cached = np.load(record.keypoints)
    last = [test[i] for i in range(len(test)) if test[i]["tracklet"] == 0][-1]
    padded = len(record.frames) % 4
    if padded:  # padded frames repeat the last frame's keypoints (scaled), never zeros
        assert torch.equal(last["keypoints"][padded - 1], last["keypoints"][-1])
        assert last["keypoints"][-1, :, 2].tolist() == cached[-1, :, 2].tolist()
    assert not last["erased"].any()
    no_cache = ClipDataset([type(record)(frames=record.frames, pid=1, camid=0)], mode="test", size=(64, 32))
    assert no_cache[0]["keypoints"].abs().sum() == 0


def test_validation_split_holds_out_training_identities(tmp_path):
    ds = build_dataset("synthetic", tmp_path / "syn", **{**SMALL, "num_ids": 16})
    val = ds.validation_split(fraction=0.25, seed=0)
    assert val.num_train_pids == ds.num_train_pids - 2
    assert sorted({r.pid for r in val.train}) == list(range(val.num_train_pids))
    held = {r.frames for r in val.query + val.gallery}
    assert held and not held & {r.frames for r in val.train}
    assert held <= {r.frames for r in ds.train}
    for q in val.query:
        assert any(g.pid == q.pid and g.camid != q.camid for g in val.gallery)


def test_swapped_families_share_one_palette_in_different_places(tmp_path):
    from training.synthetic import SWAPPED_GARMENTS, make_identities

    config = SyntheticConfig(num_ids=12, family_size=6, families="swapped")
    identities = make_identities(config, np.random.default_rng(0))
    for family in (identities[:6], identities[6:]):
        palettes = [frozenset(getattr(look, g) for g in SWAPPED_GARMENTS) for look, _ in family]
        assert len(set(palettes)) == 1 and len(palettes[0]) == 3  # the same three colours
        assert len({tuple(getattr(look, g) for g in SWAPPED_GARMENTS) for look, _ in family}) == 6  # all placements
        assert len({(look.skin, look.hair, look.shoes) for look, _ in family}) == 1
    dataset = build_dataset("synthetic", tmp_path / "swapped", **{**SMALL, "families": "swapped"})
    assert dataset.num_train_pids == 4 and dataset.query
    with pytest.raises(ValueError, match="family_size must be <= 6"):
        SyntheticConfig(num_ids=16, family_size=8, families="swapped")


@pytest.mark.parametrize("seed", range(4))
def test_validation_queries_one_per_identity_and_camera_each_with_a_match(seed):
    from training.records import Dataset, TrackletRecord, unmatched_queries

    layout = {1: "AB", 2: "AABB", 3: "AAABC", 4: "AA"}  # tracklets per id, by camera letter
    records = [TrackletRecord(frames=(f"{pid}-{n}.jpg",), pid=pid, camid="ABC".index(cam))
               for pid, cams in layout.items() for n, cam in enumerate(cams)]
    val = Dataset("constructed", records, [], [], num_cameras=3).validation_split(0.75, seed=seed)
    # id 4 (one camera) can never be matched: it stays in training; ids 1-3 give 1 + 2 + 2 queries
    assert sorted(r.pid for r in val.query) == [1, 2, 2, 3, 3] and unmatched_queries(val.query, val.gallery) == []
    assert len(val.query) + len(val.gallery) == 11 and val.num_train_pids == 1
